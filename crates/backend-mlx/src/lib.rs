//! backend-mlx: filled by a later issue.
