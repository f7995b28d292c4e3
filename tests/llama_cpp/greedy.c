/* llama.cpp itself reading a GGUF file that amthal exported: an independent check
 * (tests/llama_cpp_reads_export.rs). Loads FILE on the CPU with the CPU backend found
 * in BACKEND_DIR, tokenizes PROMPT as llama.cpp does (BOS added when the file says so,
 * special tokens parsed), decodes TOKENS tokens greedily (argmax of the logits, no
 * sampler, no penalty) and prints two lines of token ids:
 *
 *   prompt 1 2 3
 *   greedy 4 5 6
 *
 * With LOGITS_OUT, the logits after the prompt (n_vocab f32 values, the host's byte
 * order) are also written there, for a comparison of values, not only of argmaxes.
 *
 * Built by the test against the prebuilt libllama that scripts/setup fetches from npm
 * (@node-llama-cpp/linux-x64) and the headers of the same release in include/. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int argmax(const float *logits, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s FILE BACKEND_DIR PROMPT TOKENS [LOGITS_OUT]\n", argv[0]);
        return 2;
    }
    const char *file = argv[1], *prompt = argv[3];
    int new_tokens = atoi(argv[4]);
    llama_log_set(quiet, NULL);
    ggml_backend_load_all_from_path(argv[2]);
    llama_backend_init();

    struct llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(file, model_params);
    if (!model) {
        fprintf(stderr, "llama.cpp could not load %s\n", file);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);

    int capacity = (int)strlen(prompt) + 8;
    llama_token *tokens = malloc(sizeof(llama_token) * (size_t)(capacity + new_tokens));
    int n_prompt = llama_tokenize(vocab, prompt, (int)strlen(prompt), tokens, capacity, true, true);
    if (n_prompt <= 0) {
        fprintf(stderr, "llama.cpp could not tokenize the prompt (%d)\n", n_prompt);
        return 1;
    }

    struct llama_context_params context_params = llama_context_default_params();
    context_params.n_ctx = (uint32_t)(n_prompt + new_tokens + 16);
    context_params.n_batch = context_params.n_ctx;
    context_params.n_threads = 2;
    context_params.n_threads_batch = 2;
    struct llama_context *context = llama_init_from_model(model, context_params);
    if (!context) {
        fprintf(stderr, "llama.cpp could not make a context\n");
        return 1;
    }

    printf("prompt");
    for (int i = 0; i < n_prompt; i++) printf(" %d", tokens[i]);
    printf("\ngreedy");
    struct llama_batch batch = llama_batch_get_one(tokens, n_prompt);
    for (int step = 0; step < new_tokens; step++) {
        if (llama_decode(context, batch) != 0) {
            fprintf(stderr, "llama_decode failed at step %d\n", step);
            return 1;
        }
        const float *logits = llama_get_logits_ith(context, -1);
        if (step == 0 && argc == 6) {
            FILE *out = fopen(argv[5], "wb");
            if (!out || fwrite(logits, sizeof(float), (size_t)n_vocab, out) != (size_t)n_vocab ||
                fclose(out) != 0) {
                fprintf(stderr, "could not write %s\n", argv[5]);
                return 1;
            }
        }
        llama_token next = argmax(logits, n_vocab);
        printf(" %d", next);
        tokens[n_prompt + step] = next;
        batch = llama_batch_get_one(&tokens[n_prompt + step], 1);
    }
    printf("\n");
    llama_free(context);
    llama_model_free(model);
    free(tokens);
    return 0;
}
