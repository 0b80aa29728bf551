//! How a text is put before a model sees it: sentence-transformers' prompt
//! for its kind (query or document) and its `do_lower_case`.
//!
//! # Invariants
//! - The one place either happens: the front door applies its generation's
//!   form to every text before it counts the text's tokens and before the
//!   engine gets it, so the token limits count the prompt and truncation
//!   cuts what sentence-transformers cuts.
//! - The order is sentence-transformers': the prompt is put first, then
//!   the whole (prompt included) is lowercased.
//! - A plain form (no prompt, no lowercasing) gives every text back
//!   unchanged, without a copy.

use super::describe::Description;

/// A model's prompts and lowercasing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextForm {
    query: Option<String>,
    document: Option<String>,
    lowercase: bool,
}

impl TextForm {
    /// A form of these prompts (an empty one is none) and lowercasing.
    pub fn new(query: Option<String>, document: Option<String>, lowercase: bool) -> TextForm {
        TextForm {
            query: query.filter(|p| !p.is_empty()),
            document: document.filter(|p| !p.is_empty()),
            lowercase,
        }
    }

    /// The form `description` asks for.
    pub fn of(description: &Description) -> TextForm {
        TextForm::new(
            description.prompt(true).map(str::to_owned),
            description.prompt(false).map(str::to_owned),
            description.do_lower_case(),
        )
    }

    /// Whether it leaves every text as it is.
    pub fn is_plain(&self) -> bool {
        self.query.is_none() && self.document.is_none() && !self.lowercase
    }

    /// The prompt put before a query (`is_query`) or a document, if any.
    pub fn prompt(&self, is_query: bool) -> Option<&str> {
        if is_query {
            self.query.as_deref()
        } else {
            self.document.as_deref()
        }
    }

    /// `text` as the model must see it.
    pub fn apply(&self, text: String, is_query: bool) -> String {
        let text = match self.prompt(is_query) {
            Some(prompt) => format!("{prompt}{text}"),
            None => text,
        };
        if self.lowercase {
            text.to_lowercase()
        } else {
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_comes_first_then_the_whole_is_lowercased() {
        let form = TextForm {
            query: Some("Query: ".into()),
            document: None,
            lowercase: true,
        };
        assert_eq!(form.apply("How FAR".into(), true), "query: how far");
        assert_eq!(form.apply("It Is".into(), false), "it is");
        assert!(!form.is_plain());
        let plain = TextForm::default();
        assert!(plain.is_plain());
        assert_eq!(plain.apply("As Is".into(), true), "As Is");
    }
}
