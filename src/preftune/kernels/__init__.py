"""Hand-written autograd kernels: the same numbers as the plain PyTorch ops, less memory or time.

token_logps.py           log p(target) from (n, V) logits a block of rows at a time
tied_head.py             the tied LM head's projection, its bf16 weight gradient held
short_row_attention.py   CPU attention for short packed rows under bf16, an attention
                         implementation registered with transformers
"""
