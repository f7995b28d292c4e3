// Stub: see README.md. ATen's CUDA headers name these types only.
#pragma once
#include "cusolver_common.h"
typedef struct cusolverDnContext* cusolverDnHandle_t;
