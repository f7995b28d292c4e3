/* llama.cpp itself reading a GGUF file that amthal exported: an independent check
 * (tests/gguf_export.rs). Loads FILE on the CPU with the CPU backend found in
 * BACKEND_DIR and makes a prompt from TEXT:
 *
 *   MODE raw:  TEXT is the prompt, tokenized as llama.cpp does by default (BOS added
 *              when the file says so, special tokens parsed);
 *   MODE chat: TEXT is a user message (after SYSTEM as the system message, if
 *              given), rendered through the file's chat template
 *              (llama_chat_apply_template, with the assistant's turn opened) and
 *              tokenized as llama.cpp's own tools tokenize it: BOS added when the file
 *              says so (its built-in templates leave BOS out), special tokens parsed.
 *
 * With LORA_FILE in the environment, that GGUF LoRA adapter is applied at scale 1
 * (llama-cli's --lora).
 *
 * It writes the logits after the prompt to LOGITS_OUT (n_vocab f32 values, the host's
 * byte order), decodes TOKENS tokens greedily (argmax of the logits, no sampler, no
 * penalty) and prints the rendered prompt (chat mode, as hex bytes) and two lines of
 * token ids:
 *
 *   rendered 3c7c696d...
 *   prompt 1 2 3
 *   greedy 4 5 6
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

/* TEXT as the user's turn of the file's chat template, after SYSTEM's turn when that
 * is not NULL; NULL when the file has no template llama.cpp knows. */
static char *render_chat(const struct llama_model *model, const char *system, const char *text) {
    const char *template = llama_model_chat_template(model, NULL);
    if (!template) {
        fprintf(stderr, "the file has no chat template\n");
        return NULL;
    }
    struct llama_chat_message messages[2] = {{"system", system}, {"user", text}};
    const struct llama_chat_message *first = system ? &messages[0] : &messages[1];
    size_t count = system ? 2 : 1;
    int capacity = 2 * (int)(strlen(text) + (system ? strlen(system) : 0)) + 1024;
    char *rendered = malloc((size_t)capacity + 1);
    int length = llama_chat_apply_template(template, first, count, true, rendered, capacity);
    if (length > capacity) {
        capacity = length;
        rendered = realloc(rendered, (size_t)capacity + 1);
        length = llama_chat_apply_template(template, first, count, true, rendered, capacity);
    }
    if (length < 0) {
        fprintf(stderr, "llama.cpp does not know the file's chat template\n");
        free(rendered);
        return NULL;
    }
    rendered[length] = '\0';
    return rendered;
}

int main(int argc, char **argv) {
    if ((argc != 7 && argc != 8) || (strcmp(argv[3], "raw") != 0 && strcmp(argv[3], "chat") != 0)) {
        fprintf(stderr, "usage: %s FILE BACKEND_DIR raw|chat TEXT TOKENS LOGITS_OUT [SYSTEM]\n",
                argv[0]);
        return 2;
    }
    const char *system = argc == 8 ? argv[7] : NULL;
    const char *file = argv[1], *text = argv[4], *logits_out = argv[6];
    int chat = strcmp(argv[3], "chat") == 0;
    int new_tokens = atoi(argv[5]);
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

    char *prompt = chat ? render_chat(model, system, text) : strdup(text);
    if (!prompt) return 1;
    if (chat) {
        printf("rendered ");
        for (const unsigned char *c = (const unsigned char *)prompt; *c; c++) printf("%02x", *c);
        printf("\n");
    }
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
    const char *lora_file = getenv("LORA_FILE");
    if (lora_file) {
        struct llama_adapter_lora *lora = llama_adapter_lora_init(model, lora_file);
        float scale = 1.0f;
        if (!lora || llama_set_adapters_lora(context, &lora, 1, &scale) != 0) {
            fprintf(stderr, "llama.cpp could not apply the adapter %s\n", lora_file);
            return 1;
        }
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
        if (step == 0) {
            FILE *out = fopen(logits_out, "wb");
            if (!out || fwrite(logits, sizeof(float), (size_t)n_vocab, out) != (size_t)n_vocab ||
                fclose(out) != 0) {
                fprintf(stderr, "could not write %s\n", logits_out);
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
    free(prompt);
    return 0;
}
