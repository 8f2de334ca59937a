"""``attnbridge generate``: whole pipelines (prompt -> tokenizer -> text encoder -> transformer ->
VAE -> file) on the embedded tiny models and on checkpoints saved to a folder, and their attention
timing summaries.

Call counts are checked against the tiny configs, not against the timer's own bookkeeping: Wan has
2 blocks x (self + cross) = 4 attention layers, Qwen-Image 2 joint layers, Qwen3-MoE 2 layers; with
guidance each denoising step calls the transformer twice, and an LLM runs one forward per new token.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from attnbridge.cli import main
from attnbridge.generation.run import run_generate
from attnbridge.tiny_models import tiny_qwen3_moe, tiny_tokenizer, tiny_vocab_size, tiny_wan_pipeline

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
PROMPT = "a red fox running through snow"

#: model -> (attention layers, model forward calls for STEPS, output suffix)
TINY = {
    "wan-tiny": (4, 2 * STEPS, ".gif"),
    "qwen-image-tiny": (2, 2 * STEPS, ".png"),
    "qwen3-moe-tiny": (2, STEPS, ".txt"),
}


def _generate(tmp_path: Path, model: str, *extra: str) -> dict:
    """Run the CLI in this process; return the timing JSON it wrote."""
    argv = [
        "generate",
        "--model",
        model,
        "--backend",
        "sdpa",
        "--steps",
        str(STEPS),
        "--output",
        str(tmp_path),
    ]
    assert main([*argv, "--prompt", PROMPT, *extra]) == 0
    (timing,) = tmp_path.glob(f"{Path(model).name}-sdpa*.timing.json")  # the options follow the backend
    return json.loads(timing.read_text())


def _frames(path: Path) -> list[np.ndarray]:
    return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(path))]


def _check_output(path: Path, suffix: str, frames: int = 17, size: tuple[int, int] = (64, 128)) -> None:
    """The file holds decoded pixels / generated text, not an empty placeholder (videos: the tiny
    Wan's 17 frames of 64x128 unless told otherwise)."""
    assert path.suffix == suffix and path.is_file()
    if suffix == ".gif":
        frames_read = _frames(path)
        assert len(frames_read) == frames and frames_read[0].shape == (*size, 3)
        frames = frames_read
        assert np.std(np.stack(frames)) > 0
    elif suffix == ".png":
        image = np.asarray(Image.open(path))
        assert image.shape == (32, 32, 3) and np.std(image) > 0
    else:
        text = path.read_text(encoding="utf-8")
        assert text.startswith(PROMPT) and len(text.rstrip("\n")) > len(PROMPT)


@pytest.mark.parametrize("model", list(TINY))
def test_tiny_model_writes_output_and_timing(tmp_path, model):
    layers, forward_calls, suffix = TINY[model]
    summary = _generate(tmp_path, model)

    _check_output(Path(next(v for k, v in summary["files"].items() if k != "timing")), suffix)
    assert summary["forward_calls"] and sum(summary["forward_calls"].values()) == forward_calls
    attention = summary["attention"]
    assert attention["layers"] == layers
    assert attention["calls"] == layers * forward_calls > 0
    assert all(layer["calls"] == forward_calls for layer in summary["layers"].values())
    assert 0 < attention["seconds"] < summary["pipeline_seconds"]
    assert sum(row["calls"] for row in summary["by_backend_kind"]) == attention["calls"]
    assert {row["backend"] for row in summary["by_backend_kind"]} == {"sdpa"}
    on_gpu = torch.cuda.is_available()  # generate picks the accelerator it finds
    assert summary["device"] == ("cuda" if on_gpu else "cpu")
    assert summary["dtype"] == ("bfloat16" if on_gpu else "float32")
    assert "noise" in summary["notes"][0]  # random weights say so


def test_wan_timing_splits_self_and_cross(tmp_path):
    rows = {row["kind"]: row for row in _generate(tmp_path, "wan-tiny")["by_backend_kind"]}
    assert set(rows) == {"self", "cross"}
    assert rows["self"]["calls"] == rows["cross"]["calls"] == 2 * 2 * STEPS


def test_timing_measures_time_spent_in_attention(tmp_path, monkeypatch):
    """A kernel that sleeps 20 ms must show up as >= 20 ms per call, and not in layers' idle time; a
    layer's first call is reported apart from the rest."""
    from attnbridge.attention.backends.sdpa import TorchSDPAImpl

    original = TorchSDPAImpl.forward

    def slow(self, q, k, v, **kwargs):
        time.sleep(0.02)
        return original(self, q, k, v, **kwargs)

    monkeypatch.setattr(TorchSDPAImpl, "forward", slow)
    summary = _generate(tmp_path, "qwen3-moe-tiny")
    attention = summary["attention"]
    calls, layers = attention["calls"], attention["layers"]
    assert calls == 2 * STEPS and layers == 2
    # A first call also holds warm-up (kernel loading on a GPU): only its lower bound is tight.
    assert 0.02 * layers <= attention["first_call_seconds"] < 0.02 * layers + 10.0
    assert 0.02 * (calls - layers) <= attention["seconds"] < 0.02 * (calls - layers) + 1.0
    fraction = attention["fraction_of_pipeline"]
    total = attention["seconds"] + attention["first_call_seconds"]
    assert fraction == pytest.approx(total / summary["pipeline_seconds"])
    assert fraction < 1


def test_device_event_timing_reports_the_first_call_apart():
    """On an accelerator the calls are timed with device events, read at the end: the first pair
    is the layer's first call (compilation, warm-up) and must not land in the steady time."""
    from attnbridge.generation.timing import LayerRecord

    class Event:
        def __init__(self, ms: float):
            self.ms = ms

        def elapsed_time(self, end: Event) -> float:
            return end.ms - self.ms

        def synchronize(self) -> None:
            pass

    record = LayerRecord("sdpa", calls=3)
    record.events = [(Event(0), Event(500)), (Event(600), Event(610)), (Event(700), Event(720))]
    record.resolve_events()
    assert record.first_seconds == pytest.approx(0.5) and record.seconds == pytest.approx(0.03)


def test_layers_are_restored_after_the_run(tmp_path):
    """The timer observes the layers for the run only; a later run times from zero again."""
    first = run_generate("qwen3-moe-tiny", steps=1, output=tmp_path)
    second = run_generate("qwen3-moe-tiny", steps=1, output=tmp_path)
    assert first["attention"]["calls"] == second["attention"]["calls"] == 2


def test_saved_diffusers_pipeline_folder_runs(tmp_path):
    folder = tmp_path / "my-wan"
    tiny_wan_pipeline(complete=True).save_pretrained(folder)
    sizes = ["height=32", "width=32", "num_frames=5", "max_sequence_length=16"]
    summary = _generate(tmp_path / "out", str(folder), *[a for s in sizes for a in ("--option", s)])
    assert summary["model"] == "my-wan" and summary["notes"] == []
    _check_output(Path(summary["files"]["video"]), ".gif", frames=5, size=(32, 32))
    assert summary["attention"]["calls"] == 4 * 2 * STEPS


def test_saved_transformers_model_folder_runs(tmp_path):
    folder = tmp_path / "my-llm"
    tiny_qwen3_moe(vocab_size=tiny_vocab_size()).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    summary = _generate(tmp_path / "out", str(folder))
    assert summary["model"] == "my-llm"
    _check_output(Path(summary["files"]["text"]), ".txt")
    assert summary["attention"]["calls"] == 2 * STEPS


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("wan-huge", [], r"unknown model 'wan-huge'.*wan-tiny, qwen-image-tiny, qwen3-moe-tiny"),
        ("{empty}", [], r"neither model_index.json .* nor config.json"),
        ("{file}", [], r"is a file"),
        ("qwen-image-tiny", ["num_frames=5"], r"\['num_frames'\] are not arguments of QwenImagePipeline"),
        ("qwen3-moe-tiny", ["height=32"], r"only max_new_tokens"),
        ("wan-tiny", ["dtype=float8"], r"dtype must be one of float32, bfloat16, float16"),
        ("wan-tiny", ["sparsity=0.5"], r"backend 'sdpa' does not take option\(s\) \['sparsity'\]"),
    ],
)
def test_errors_name_their_cause(tmp_path, model, options, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a model")
    model = model.format(empty=tmp_path / "empty", file=tmp_path / "file")
    with pytest.raises(ValueError, match=message):
        run_generate(model, steps=1, output=tmp_path / "out", config=dict(o.split("=") for o in options))
    assert not (tmp_path / "out").exists()


def test_script_runs_like_the_cli(tmp_path, monkeypatch):
    argv = ["scripts/generate.py", "--model", "qwen3-moe-tiny", "--steps", "1", "--output", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "generate.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert (tmp_path / "qwen3-moe-tiny-sdpa.txt").is_file()


def test_demo_command_in_a_fresh_process(tmp_path):
    """``make demo``'s command, as a new process (no download, no accelerator needed)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-m",
        "attnbridge",
        "generate",
        "--model",
        "wan-tiny",
        "--backend",
        "block_sparse",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "attention total" in done.stdout and "block_sparse" in done.stdout
    assert (tmp_path / "outputs" / "wan-tiny-block_sparse.gif").is_file()
    timing = json.loads((tmp_path / "outputs" / "wan-tiny-block_sparse.timing.json").read_text())
    kept = {row["kind"]: row["kept_fraction"] for row in timing["by_backend_kind"]}
    assert 0 < kept["self"] < 0.5, kept  # the demo shows sparse attention skipping blocks
    assert f"{kept['self']:.2f}" in done.stdout


@pytest.mark.parametrize(("backend", "options"), [("rain_fusion", {"sparsity": 0.5}), ("vsa", {})])
def test_every_sparse_backend_skips_blocks_on_the_tiny_wan(tmp_path, backend, options):
    summary = run_generate(
        "wan-tiny", backend=backend, steps=1, output=tmp_path, device="cpu", config=options
    )
    kept = {row["kind"]: row["kept_fraction"] for row in summary["by_backend_kind"]}
    assert 0 < kept["self"] < 1, kept


def test_two_processes_share_the_sequence_and_rank0_writes(tmp_path):
    """torchrun with 2 gloo processes: Ulysses over both by default, one set of files, same video as
    one process (GIF palette quantisation allowed: max 8/255)."""
    single = run_generate("wan-tiny", steps=STEPS, output=tmp_path / "single", device="cpu")
    # More ranks than this machine may have GPUs: the ranks run on the CPU over gloo.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "ATTNBRIDGE_PLATFORM": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [
        "scripts/generate.py",
        "--model",
        "wan-tiny",
        "--steps",
        str(STEPS),
        "--output",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("attention total") == 1  # rank 0 reports
    summary = json.loads((tmp_path / "wan-tiny-sdpa-ulysses_degree2.timing.json").read_text())
    assert summary["world_size"] == 2 and summary["backend_options"] == {"ulysses_degree": 2}
    assert summary["attention"]["calls"] == 4 * 2 * STEPS  # Ulysses: one kernel call per attention call
    ours = np.stack(_frames(tmp_path / "wan-tiny-sdpa-ulysses_degree2.gif")).astype(int)
    reference = np.stack(_frames(Path(single["files"]["video"]))).astype(int)
    assert ours.shape == reference.shape and np.abs(ours - reference).max() <= 8


def test_cli_reports_a_bad_option_as_one_error_line(tmp_path, capsys):
    code = main(
        ["generate", "--model", "wan-tiny", "--option", "sparsity=0.5", "--output", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("attnbridge generate: error: backend 'sdpa' does not take option(s) ['sparsity']")
    assert "Traceback" not in err


def _has_torch_npu() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_npu") is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--option", "sparsity"], "--option expects key=value (e.g. sparsity=0.75), got 'sparsity'"),
        (["--backend", "block_sparse", "--option", "sparsity=2"], "sparsity must be a number in [0, 1)"),
        (
            ["--backend", "vsa", "--option", "fastvideo_kernel=maybe"],
            "fastvideo_kernel must be True or False",
        ),
        (["--option", "dtype=float8"], "dtype must be one of float32, bfloat16, float16"),
        (["--device", "tpu"], "--device 'tpu'"),
        pytest.param(
            ["--device", "cuda"],
            "no cuda device is available on this machine",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        pytest.param(
            ["--device", "npu"],
            "--device 'npu': torch_npu cannot be imported",
            marks=pytest.mark.skipif(_has_torch_npu(), reason="this machine has torch_npu"),
        ),
        (["--backend", "flash9"], "argument --backend: invalid choice: 'flash9'"),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["stray"], "unrecognized arguments: stray"),
    ],
)
def test_every_cli_error_is_one_line_with_exit_2(tmp_path, capsys, argv, message):
    try:
        code = main(["generate", "--model", "wan-tiny", "--output", str(tmp_path / "o"), *argv])
    except SystemExit as exit_:  # argparse's own errors leave through the parser
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    prefixes = ("attnbridge generate: error: ", "attnbridge: error: ")  # the latter: left-over arguments
    assert err.count("\n") == 1 and err.startswith(prefixes) and message in err, err


def test_generate_help_shows_defaults_and_the_option_keys(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    assert "(default: wan-tiny)" in out and "(default: 4)" in out and "(default: sdpa)" in out
    for key in ("height", "width", "num_frames", "dtype", "ulysses_degree", "strict"):
        assert f"{key}:" in out


def test_output_names_carry_the_options(tmp_path):
    first = run_generate(
        "qwen3-moe-tiny", backend="fa", steps=1, output=tmp_path, config={"max_new_tokens": 2}
    )
    second = run_generate(
        "qwen3-moe-tiny", backend="fa", steps=1, output=tmp_path, config={"max_new_tokens": 3}
    )
    assert first["files"]["text"] != second["files"]["text"]
    assert Path(first["files"]["text"]).is_file() and Path(second["files"]["text"]).is_file()


def test_kept_fraction_is_read_from_the_joint_calls_that_carry_the_padded_queries():
    """Text padded in every prompt: its queries ride in the joint call (dense rows after the selection's,
    no second call), and the kept fraction comes from the layer's second joint call, as without padding."""
    from attnbridge.enable import enable_npu_attention
    from attnbridge.generation.timing import AttentionTimer
    from attnbridge.tiny_models import tiny_qwen_image_transformer
    from tests.tiny_inputs import qwen_image_inputs

    model = tiny_qwen_image_transformer()
    inputs = qwen_image_inputs(text_tokens=5, text_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    handle = enable_npu_attention(model, "block_sparse", sparsity=0.5)
    timer = AttentionTimer(handle.layers, {"": model})
    with timer, torch.no_grad():
        for _ in range(2):
            model(**inputs)
    records = timer.records.values()
    assert all(r.kinds == {"joint": 2} for r in records)
    assert all(r.kept_fraction == 1.0 for r in records)  # 15 tokens: one block, always kept
