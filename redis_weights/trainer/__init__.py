"""The trainer side: ``RedisWeightUpdater`` and its background upload thread."""
