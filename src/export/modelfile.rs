//! An Ollama `Modelfile` for an exported GGUF: `FROM` the file, the chat template in
//! Ollama's Go-template syntax for the families amthal recognises (ChatML, as SmolLM2
//! and Qwen use; Llama 2's `[INST]`, as ALLaM uses), the stop tokens, and greedy
//! decoding as `amthal evaluate` does by default. For any other template the Modelfile
//! leaves TEMPLATE out: Ollama then reads `tokenizer.chat_template` from the GGUF and
//! matches it against its own library. A template that writes a system message of its
//! own when the conversation has none (SmolLM2's "You are a helpful AI assistant named
//! SmolLM, ...") gets it as `SYSTEM`: Ollama's templates write `.System` only when one
//! is set, and without it the model would be prompted otherwise than amthal trained
//! and evaluated it.

use crate::prompt::{ChatTemplate, Message};
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
    if let Some(system) = default_system_message(tokenizer) {
        out.push_str(&format!(
            "# The chat template's own system message, which amthal's prompts carry:\nSYSTEM \"\"\"{system}\"\"\"\n"
        ));
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

/// The system message the tokenizer's chat template writes when a conversation has
/// none, if it writes one (`system_message_of_its_own`).
pub fn default_system_message(tokenizer: &ModelTokenizer) -> Option<String> {
    let source = tokenizer.chat_template.as_deref()?;
    let template = ChatTemplate::new(source, tokenizer.special_token_texts()).ok()?;
    system_message_of_its_own(&template)
}

/// The system message `template` writes when a conversation has none: found by
/// rendering a user turn alone and with a marker system message, and kept only when
/// that text as the system message renders the same prompt. None for templates without
/// one (Llama 2's, ALLaM's), for text Ollama's `"""` quoting cannot hold, and for
/// templates that do not render.
fn system_message_of_its_own(template: &ChatTemplate) -> Option<String> {
    let user = Message::new("user", "amthal-user-turn");
    let alone = template.render(std::slice::from_ref(&user), true).ok()?;
    let marker = "amthal-system-marker";
    let marked = template
        .render(&[Message::new("system", marker), user.clone()], true)
        .ok()?;
    let (before, after) = marked.split_once(marker)?;
    let system = alone.strip_prefix(before)?.strip_suffix(after)?;
    let same = template
        .render(&[Message::new("system", system), user], true)
        .ok()?;
    (!system.trim().is_empty() && same == alone && !system.contains("\"\"\""))
        .then(|| system.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML_WITH_DEFAULT: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source, vec![]).unwrap()
    }

    #[test]
    fn a_template_that_writes_its_own_system_message_gives_it() {
        assert_eq!(
            system_message_of_its_own(&template(CHATML_WITH_DEFAULT)).as_deref(),
            Some("You are a helpful assistant.")
        );
    }

    #[test]
    fn a_template_without_one_gives_none() {
        // ChatML without a default, and a template that ignores system turns (the user
        // turn alone then renders as with the marker: nothing between them).
        let plain = CHATML_WITH_DEFAULT.replace(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
            "",
        );
        assert_eq!(system_message_of_its_own(&template(&plain)), None);
        let users_only = "{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% endif %}{% endfor %}";
        assert_eq!(system_message_of_its_own(&template(users_only)), None);
    }
}
