"""SynthMed, the embedded default: the generator, the tiny expert CLIP and base LVLM it trains,
tiny random checkpoint builders, and ``medalign prepare data=synthmed``."""
