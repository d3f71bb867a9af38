"""Building blocks of the decoder: linear, attention, norm, rotary embedding, sampler."""
