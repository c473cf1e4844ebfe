//! batching-queue: filled by a later issue.
