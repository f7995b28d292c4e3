//! Errors that are the user's to fix (a bad file, a missing column, a wrong flag) are
//! `BadInput`: `main` prints them without a backtrace and exits with code 2. Anything
//! else (a bug, an I/O failure mid-run) exits with code 1.

use std::fmt;

/// Exit code for bad input: the user can fix it by changing files or flags.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code for everything else.
pub const EXIT_FAILURE: i32 = 1;

/// A problem with what the user gave us. The message names the file, the row and
/// what is wrong, so it can be fixed without reading code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// `bail_input!("{}: row {}: empty proverb", path, row)` returns a `BadInput` error.
#[macro_export]
macro_rules! bail_input {
    ($($arg:tt)*) => {
        return Err(::anyhow::Error::new($crate::error::BadInput(format!($($arg)*))))
    };
}

/// Builds a `BadInput` error as an `anyhow::Error`, for `ok_or_else` and `map_err`.
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(BadInput(message.into()))
}

/// The exit code for an error: 2 when any cause in its chain is `BadInput`.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    if error.chain().any(|cause| cause.is::<BadInput>()) {
        EXIT_BAD_INPUT
    } else {
        EXIT_FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_anywhere_in_the_chain_exits_2() {
        let inner = bad_input("data.csv: row 3: empty proverb");
        let wrapped = inner.context("reading the training split");
        assert_eq!(exit_code(&wrapped), EXIT_BAD_INPUT);
        let other = anyhow::anyhow!("disk on fire");
        assert_eq!(exit_code(&other), EXIT_FAILURE);
    }
}
