"""HTTP routes: ``openai`` (/v1/*), ``legacy`` (/telechat/gptDialog/*), ``health`` (/health, /ready, /metrics)."""
