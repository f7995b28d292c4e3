/* ggml's own block quantizers, for a byte-for-byte comparison with amthal's
 * (tests/gguf_export.rs): reads VALUES (f32, the host's byte order) as rows of
 * N_PER_ROW, quantizes them to the ggml type TYPE (its number: 8 Q8_0, 6 Q5_0,
 * 12 Q4_K, 14 Q6_K) with ggml_quantize_chunk, what llama-quantize calls, optionally
 * weighted by IMATRIX (N_PER_ROW f32 values, an importance matrix's row), and writes
 * the blocks to OUT. Linked against the prebuilt libggml-base that scripts/setup
 * fetches from npm. */
#include <stdio.h>
#include <stdlib.h>

#include "ggml.h"

static float *read_floats(const char *path, long *count) {
    FILE *file = fopen(path, "rb");
    if (!file) return NULL;
    fseek(file, 0, SEEK_END);
    long bytes = ftell(file);
    fseek(file, 0, SEEK_SET);
    float *values = malloc((size_t)bytes);
    if (fread(values, 1, (size_t)bytes, file) != (size_t)bytes) {
        fclose(file);
        free(values);
        return NULL;
    }
    fclose(file);
    *count = bytes / (long)sizeof(float);
    return values;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s TYPE N_PER_ROW VALUES OUT [IMATRIX]\n", argv[0]);
        return 2;
    }
    enum ggml_type type = (enum ggml_type)atoi(argv[1]);
    long n_per_row = atol(argv[2]), count = 0, imatrix_count = 0;
    float *values = read_floats(argv[3], &count);
    float *imatrix = argc == 6 ? read_floats(argv[5], &imatrix_count) : NULL;
    if (!values || (argc == 6 && (!imatrix || imatrix_count != n_per_row)) || count % n_per_row) {
        fprintf(stderr, "bad input: %ld values, %ld importances, rows of %ld\n", count,
                imatrix_count, n_per_row);
        return 1;
    }
    long rows = count / n_per_row;
    size_t size = ggml_row_size(type, n_per_row) * (size_t)rows;
    void *blocks = malloc(size);
    size_t written = ggml_quantize_chunk(type, values, blocks, 0, rows, n_per_row, imatrix);
    FILE *out = fopen(argv[4], "wb");
    if (written != size || !out || fwrite(blocks, 1, size, out) != size || fclose(out) != 0) {
        fprintf(stderr, "could not quantize or write %s\n", argv[4]);
        return 1;
    }
    free(blocks);
    free(values);
    free(imatrix);
    return 0;
}
