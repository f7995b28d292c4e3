//! The one prompt builder that training, loss and generation all use, so they never
//! disagree about what the model sees.
//!
//! - `plain`: the seed's text, `INSTRUCTION + "Proverb: {p}\nExplanation:"`; the answer
//!   follows as `" " + reference` and ends with the tokenizer's EOS.
//! - `chat`: that text as the user turn of the model's chat template, rendered with
//!   `add_generation_prompt=true`; the answer ends with the template's end-of-turn token.
//! - `auto`: chat when the model has a template, else plain.
//!
//! Templates are rendered with minijinja set up like transformers' Jinja environment
//! (trim_blocks, lstrip_blocks, loop controls, Python string methods, raise_exception),
//! so real Hugging Face templates render byte-for-byte the same.

use anyhow::{Context, Result};
use indexmap::IndexMap;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};

use crate::bail_input;
use crate::tokenizer::ModelTokenizer;

/// The seed's unified instruction, verbatim.
pub const INSTRUCTION: &str = "You are a linguistic expert in Yemeni proverbs. Explain the figurative meaning of the following proverb clearly and concisely in Modern Standard Arabic only. Do not translate into English.\n";

/// The user-turn text for a proverb (also the whole prompt in `plain` format).
pub fn instruction_for(proverb: &str) -> String {
    format!("{INSTRUCTION}Proverb: {proverb}\nExplanation:")
}

/// How prompts are built, as chosen on the command line.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// Chat template when the model has one, else plain.
    #[default]
    Auto,
    /// The model's chat template, instruction as the user turn.
    Chat,
    /// The seed's plain text prompt.
    Plain,
}

/// A chat message as templates see it.
#[derive(Debug, Clone)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A chat template ready to render, with the special-token variables transformers
/// passes (bos_token, eos_token, ...).
#[derive(Clone)]
pub struct ChatTemplate {
    /// The template compiled once (as "chat") in an environment set up like transformers'.
    env: Environment<'static>,
    variables: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("variables", &self.variables)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles the template; a broken one fails here, naming the problem.
    pub fn new(source: &str, variables: Vec<(&'static str, String)>) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                crate::error::bad_input(format!("the chat template does not compile: {e:#}"))
            })?;
        Ok(ChatTemplate { env, variables })
    }

    /// Renders `messages` as transformers' `apply_chat_template(tokenize=False)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat")?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(IndexMap::from([
                    (Value::from("role"), Value::from(m.role.as_str())),
                    (Value::from("content"), Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        let mut context: IndexMap<Value, Value> = IndexMap::from([
            (Value::from("messages"), Value::from(messages)),
            (
                Value::from("add_generation_prompt"),
                Value::from(add_generation_prompt),
            ),
        ]);
        for (name, text) in &self.variables {
            context.insert(Value::from(*name), Value::from(text.as_str()));
        }
        template.render(Value::from(context)).map_err(|e| {
            crate::error::bad_input(format!("rendering the chat template failed: {e:#}"))
        })
    }
}

/// Builds prompts and answer texts in the resolved format.
#[derive(Debug, Clone)]
pub struct PromptBuilder {
    style: Style,
}

#[derive(Debug, Clone)]
enum Style {
    Plain,
    Chat {
        template: Box<ChatTemplate>,
        /// Text the template puts between the generation prompt and the answer (" " in
        /// Llama-2's "[/INST] answer </s>", nothing in ChatML).
        answer_prefix: String,
        /// The text the template puts right after an assistant answer ("<|im_end|>\n").
        after_answer: String,
    },
}

/// Stands in for an answer when we render a template to see what surrounds answers.
const ANSWER_MARKER: &str = "\u{E000}amthal-answer\u{E000}";

impl PromptBuilder {
    /// Resolves `auto` and checks that `chat` is possible for this model.
    pub fn new(format: PromptFormat, tokenizer: &ModelTokenizer) -> Result<PromptBuilder> {
        let template = match (format, &tokenizer.chat_template) {
            (PromptFormat::Plain, _) | (PromptFormat::Auto, None) => {
                return Ok(PromptBuilder {
                    style: Style::Plain,
                });
            }
            (PromptFormat::Chat, None) => bail_input!(
                "--prompt-format chat: the model has no chat template (use --prompt-format plain)"
            ),
            (_, Some(source)) => ChatTemplate::new(source, tokenizer.special_token_texts())?,
        };
        Self::from_template(template)
    }

    /// A chat-format builder for a given template.
    pub fn from_template(template: ChatTemplate) -> Result<PromptBuilder> {
        let user = [Message::new("user", &instruction_for("x"))];
        let generation_prompt = template.render(&user, true)?;
        let conversation = [user[0].clone(), Message::new("assistant", ANSWER_MARKER)];
        let full = template
            .render(&conversation, false)
            .context("rendering a user + assistant conversation with the chat template")?;
        let (answer_prefix, after_answer) = match full.find(ANSWER_MARKER) {
            Some(at) if full[..at].starts_with(&generation_prompt) => (
                full[generation_prompt.len()..at].to_string(),
                full[at + ANSWER_MARKER.len()..].to_string(),
            ),
            // The template renders history differently from a fresh prompt: answer
            // directly after the generation prompt, end with EOS.
            Some(at) => (String::new(), full[at + ANSWER_MARKER.len()..].to_string()),
            None => (String::new(), String::new()),
        };
        Ok(PromptBuilder {
            style: Style::Chat {
                template: Box::new(template),
                answer_prefix,
                after_answer,
            },
        })
    }

    pub fn is_chat(&self) -> bool {
        matches!(self.style, Style::Chat { .. })
    }

    /// The format in effect after resolving `auto`.
    pub fn format(&self) -> PromptFormat {
        if self.is_chat() {
            PromptFormat::Chat
        } else {
            PromptFormat::Plain
        }
    }

    /// The prompt text for a proverb (what generation continues from).
    pub fn prompt(&self, proverb: &str) -> Result<String> {
        self.prompt_with_shots(proverb, &[])
    }

    /// The prompt with worked examples (proverb, explanation) before the proverb: as
    /// earlier user/assistant turns in chat format; as earlier "Proverb: .. Explanation: .."
    /// blocks after the instruction in plain format.
    pub fn prompt_with_shots(&self, proverb: &str, shots: &[(String, String)]) -> Result<String> {
        match &self.style {
            Style::Plain => {
                let mut text = INSTRUCTION.to_string();
                for (shot, explanation) in shots {
                    text.push_str(&format!("Proverb: {shot}\nExplanation: {explanation}\n\n"));
                }
                text.push_str(&format!("Proverb: {proverb}\nExplanation:"));
                Ok(text)
            }
            Style::Chat { template, .. } => {
                let mut messages = Vec::with_capacity(2 * shots.len() + 1);
                for (shot, explanation) in shots {
                    messages.push(Message::new("user", &instruction_for(shot)));
                    messages.push(Message::new("assistant", explanation));
                }
                messages.push(Message::new("user", &instruction_for(proverb)));
                template.render(&messages, true)
            }
        }
    }

    /// The answer text that follows the prompt in training: `" " + reference` in plain
    /// format, the template's answer prefix + reference in chat format.
    pub fn answer(&self, reference: &str) -> String {
        match &self.style {
            Style::Plain => format!(" {reference}"),
            Style::Chat { answer_prefix, .. } => format!("{answer_prefix}{reference}"),
        }
    }

    /// Whether the prompt is tokenized with the tokenizer's own BOS/EOS: yes for plain
    /// text (as `tokenizer(prompt)` does), no for chat (the template writes them).
    pub fn prompt_adds_special_tokens(&self) -> bool {
        !self.is_chat()
    }

    /// The text the chat template writes after an answer, if chat.
    pub fn text_after_answer(&self) -> Option<&str> {
        match &self.style {
            Style::Plain => None,
            Style::Chat { after_answer, .. } => Some(after_answer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn plain_prompt_is_the_seed_text() {
        assert_eq!(
            instruction_for("المثل"),
            format!("{INSTRUCTION}Proverb: المثل\nExplanation:")
        );
        assert!(INSTRUCTION.ends_with("Do not translate into English.\n"));
    }

    #[test]
    fn chatml_answer_is_followed_by_im_end() {
        let builder =
            PromptBuilder::from_template(ChatTemplate::new(CHATML, vec![]).unwrap()).unwrap();
        assert_eq!(builder.text_after_answer(), Some("<|im_end|>\n"));
        assert_eq!(builder.answer("جواب"), "جواب");
        let prompt = builder.prompt("مثل").unwrap();
        assert!(prompt.starts_with("<|im_start|>user\nYou are a linguistic expert"));
        assert!(prompt.ends_with("Explanation:<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn raise_exception_surfaces_as_an_error() {
        let template =
            ChatTemplate::new("{{ raise_exception('only user turns') }}", vec![]).unwrap();
        let error = template
            .render(&[Message::new("user", "x")], true)
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("only user turns"),
            "{error:#}"
        );
    }
}
