// Stands in for the CUDA runtime header when the kernels are compiled for the host: the runtime
// types come from CUDA's own driver_types.h, the execution model from simt.h.
#pragma once

#include "simt.h"
