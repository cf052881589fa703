"""Stage 1 of diffrep: the ADM backbone, schedules and seeded noise, pooling, image decoding, the feature cache and one extraction job (imports nothing else of ours)."""
