"""The protocol numbers every layer shares, named once (yardstick.md): evaluation windows, calibration windows,
and the chunk that bounds the memory of a logits computation."""

EVAL_SEQ_LEN = 2048  # WikiText-2 test perplexity: windows of 2048 tokens
EVAL_WINDOWS = 16  # ... the first 16 of them are the compared figure
CALIB_WINDOWS = 16  # calibration windows of WikiText-2 *valid* (GPTQ, lowra-gptq) ...
CALIB_SEQ_LEN = 2048  # ... of 2048 tokens each
LOGITS_CHUNK = 512  # positions whose logits exist at once (perplexity, the training loss, output sensitivity)
