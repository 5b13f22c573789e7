"""Kernel families on the shared skeleton (attnc/codegen/skeleton.py). Each supplies its tile bodies,
row state and epilogues as one typed object for its template (templates/<family>.py.j2):

    softmax.py   the online softmax (FlashAttention-2 forward and backward): softmax, sinks, scores
    general.py   normalizations other than softmax: multi-pass forward, sympy-derived backward
    decode.py    split-KV decoding: the rows of a KV group (query heads x new queries)
    linear.py    chunked linear attention: feature maps, chunk state, decay (docs/linear.md)

No family imports another, and none imports attnc/codegen/module.py.
"""
