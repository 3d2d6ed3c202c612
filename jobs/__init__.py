"""Entry points: the `cytosynth` command and its jobs, thin glue over synth, storage and cluster."""
