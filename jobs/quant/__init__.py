"""GPTQ quantization job: ``telechat quantize`` (see :mod:`jobs.quant.cli`)."""
