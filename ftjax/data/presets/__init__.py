"""The packaged data sets: one module each, declaring its `PRESET` (`ftjax.data.registry`)."""
