"""The worker side: ``RedisWeightReceiver``, the same-host cache, and the back-off of repeated failures."""
