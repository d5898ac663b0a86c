// The emulated build compiles the CUDA source as host C++ (MBT_EMULATE is set on the command line).
#include "../segment_layernorm/segment_layernorm.cu"
