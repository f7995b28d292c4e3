//! Real chat templates rendered exactly as transformers' apply_chat_template renders
//! them (goldens from scripts/golden/make_golden.py): SmolLM2's ChatML, a Llama-2
//! [INST] template as ALLaM uses, and one exercising namespace/loop/filters.

mod common;

use amthal::prompt::{ChatTemplate, Message};
use common::*;

#[test]
fn templates_render_like_transformers() {
    let golden = golden("chat_templates.json");
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 18);
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(fixture(&format!("templates/{name}.jinja"))).unwrap();
        let variables = vec![
            ("bos_token", case["bos_token"].as_str().unwrap().to_string()),
            ("eos_token", case["eos_token"].as_str().unwrap().to_string()),
        ];
        let template = ChatTemplate::new(&source, variables).unwrap();
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = template.render(&messages, add_generation_prompt).unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "{name} with add_generation_prompt={add_generation_prompt}, {} messages",
            messages.len()
        );
    }
}

#[test]
fn llama2_template_raises_on_non_alternating_roles() {
    let source = std::fs::read_to_string(fixture("templates/llama2.jinja")).unwrap();
    let template = ChatTemplate::new(
        &source,
        vec![("bos_token", "<s>".into()), ("eos_token", "</s>".into())],
    )
    .unwrap();
    let error = template
        .render(
            &[Message::new("user", "a"), Message::new("user", "b")],
            true,
        )
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("Conversation roles must alternate"),
        "{error:#}"
    );
}

#[test]
fn a_broken_template_is_bad_input() {
    let error = ChatTemplate::new("{% for m in messages %}{{ m.content }}", vec![]).unwrap_err();
    assert_eq!(amthal::error::exit_code(&error), 2);
    assert!(
        format!("{error:#}").contains("chat template does not compile"),
        "{error:#}"
    );
}
