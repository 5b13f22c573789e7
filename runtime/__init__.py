"""attnc.runtime: everything a generated module needs at run time (never the compiler).

Generated modules import only torch, triton and this package.
"""
