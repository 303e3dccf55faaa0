"""Inference runtimes and exporters: what turns a compressed LSTM into measured latency."""
