"""Quantization job (GPTQ int4/int8, FP8 weights): ``telechat quantize`` (see :mod:`jobs.quant.cli`)."""
