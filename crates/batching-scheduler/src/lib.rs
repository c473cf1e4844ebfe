//! batching-scheduler: filled by a later issue.
