"""CUDA sources of mbt_fast (one folder per op, common/ headers, emu/ CPU emulation) and their build
recipe (``build.py``); ``mbt_fast.cuda_ext`` compiles and loads them on demand."""
