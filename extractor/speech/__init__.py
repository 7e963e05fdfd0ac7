"""The speech front end: audio and timings in, model-ready interleaved sequences out."""
