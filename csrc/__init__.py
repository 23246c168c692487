"""The fused C++ operators (gru4rec_cpu.cc) and their Python glue (kernel.py)."""
