//! sim-backend: filled by a later issue.
