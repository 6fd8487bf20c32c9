"""The protocols over Redis: versions (allocate, commit, GC), the content-addressed chunks, the
ranks, overlap staging, one push, GC off the hot path, and a version
assembled from what Redis holds."""
