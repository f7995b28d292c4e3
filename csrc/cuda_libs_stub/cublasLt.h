// Stub: see README.md. ATen/cuda/CUDAContextLight.h names this handle type only.
#pragma once
typedef struct cublasLtContext* cublasLtHandle_t;
