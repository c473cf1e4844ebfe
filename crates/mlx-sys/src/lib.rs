//! Our own mlx-sys: filled by the MLX issue.
