"""GLIGEN's drop rates for classifier-free guidance training of the ACS (synth.acs_training), in
a module without torch: `cytosynth finetune-abnormal --help` shows them as the defaults."""

PROMPT_DROPOUT = 0.5  # GLIGEN's caption drop rate
GROUNDING_DROPOUT = 0.1  # GLIGEN's grounding-token drop rate
