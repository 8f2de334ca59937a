"""What the sparse backends share: token layouts, block selection and the block-sparse kernels."""
