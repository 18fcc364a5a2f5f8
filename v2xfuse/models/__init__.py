from ..utils.malloc import tune_malloc

# Before the first large map is allocated: see v2xfuse.utils.malloc (V2XFUSE_TUNE_MALLOC=0: off).
tune_malloc()
