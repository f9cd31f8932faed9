//! What Skein knows of well-known models without being told: the most output tokens each can
//! produce. A request asking for more (Claude Code asks for 32000 of every model) is clamped
//! to it rather than refused by the upstream. A deployment's own `max_output_tokens` wins.

/// Model-name prefixes and their output-token limit; the longest matching prefix applies.
const MAX_OUTPUT_TOKENS: &[(&str, u64)] = &[
    ("gpt-3.5-turbo", 4_096),
    ("gpt-4", 8_192),
    ("gpt-4-turbo", 4_096),
    ("gpt-4o", 16_384),
    ("gpt-4o-mini", 16_384),
    ("gpt-4.1", 32_768),
    ("gpt-5", 128_000),
    ("o1", 100_000),
    ("o1-mini", 65_536),
    ("o3", 100_000),
    ("o4-mini", 100_000),
    ("claude-3-haiku", 4_096),
    ("claude-3-opus", 4_096),
    ("claude-3-5-haiku", 8_192),
    ("claude-3-5-sonnet", 8_192),
    ("claude-3-7-sonnet", 64_000),
    ("claude-sonnet-4", 64_000),
    ("claude-opus-4", 32_000),
    ("claude-opus-4-5", 64_000),
    ("claude-haiku-4", 64_000),
    ("gemini-1.5", 8_192),
    ("gemini-2.0", 8_192),
    ("gemini-2.5", 65_536),
    ("deepseek-chat", 8_192),
    ("deepseek-reasoner", 65_536),
    ("mistral-large", 32_768),
    ("llama-3.1", 8_192),
    ("llama-3.3", 8_192),
];

/// The most output tokens `model` can produce, if Skein knows. A vendor prefix
/// (`openai/gpt-4o`) is looked through.
pub fn max_output_tokens(model: &str) -> Option<u64> {
    let name = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    MAX_OUTPUT_TOKENS
        .iter()
        .filter(|(prefix, _)| name.starts_with(prefix))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, limit)| *limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins() {
        assert_eq!(max_output_tokens("gpt-4o-mini"), Some(16_384));
        assert_eq!(max_output_tokens("gpt-4o-mini-2024-07-18"), Some(16_384));
        assert_eq!(max_output_tokens("gpt-4-turbo-preview"), Some(4_096));
        assert_eq!(max_output_tokens("gpt-4"), Some(8_192));
        assert_eq!(max_output_tokens("claude-3-5-haiku-20241022"), Some(8_192));
        assert_eq!(max_output_tokens("openai/gpt-4o"), Some(16_384));
        assert_eq!(max_output_tokens("my-finetune"), None);
    }
}
