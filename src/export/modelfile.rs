//! An Ollama `Modelfile` for an exported GGUF: `FROM` the file, the chat template in
//! Ollama's Go-template syntax for the families amthal recognises (ChatML, as SmolLM2
//! and Qwen use; Llama 2's `[INST]`, as ALLaM uses), the stop tokens, and greedy
//! decoding as `amthal evaluate` does by default. For any other template the Modelfile
//! leaves TEMPLATE out: Ollama then reads `tokenizer.chat_template` from the GGUF and
//! matches it against its own library.

use crate::tokenizer::ModelTokenizer;

const CHATML: &str = r#"{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"#;

const LLAMA2: &str = r#"{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}[INST] {{ if and (eq $i 0) $.System }}<<SYS>>
{{ $.System }}
<</SYS>>

{{ end }}{{ $m.Content }} [/INST]{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>{{- end }}{{- end }}"#;

/// The Modelfile text for `gguf_file` (a path relative to the Modelfile).
pub fn modelfile(gguf_file: &str, tokenizer: &ModelTokenizer) -> String {
    let mut out = format!(
        "# Written by amthal export. Create the model with:\n#   ollama create NAME -f Modelfile\nFROM ./{gguf_file}\n"
    );
    let template = tokenizer.chat_template.as_deref().unwrap_or("");
    let (go_template, stops): (Option<&str>, Vec<String>) = if template.contains("<|im_start|>") {
        (
            Some(CHATML),
            vec!["<|im_end|>".into(), "<|im_start|>".into()],
        )
    } else if template.contains("[INST]") {
        (Some(LLAMA2), vec!["[INST]".into(), "</s>".into()])
    } else {
        (None, Vec::new())
    };
    match go_template {
        Some(t) => out.push_str(&format!("TEMPLATE \"\"\"{t}\"\"\"\n")),
        None => out.push_str(
            "# No TEMPLATE: Ollama uses the chat template stored in the GGUF (tokenizer.chat_template).\n",
        ),
    }
    let mut stops = stops;
    if let Some(eos) = &tokenizer.eos
        && !stops.contains(&eos.text)
    {
        stops.push(eos.text.clone());
    }
    for stop in stops {
        out.push_str(&format!(
            "PARAMETER stop \"{}\"\n",
            stop.replace('"', "\\\"")
        ));
    }
    // amthal evaluate's default: greedy decoding.
    out.push_str("PARAMETER temperature 0\n");
    out
}
