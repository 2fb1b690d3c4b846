//! A small SQL lexer that knows just enough of PostgreSQL's lexical rules
//! (quoted identifiers, standard and escape strings, dollar quoting, nested
//! block comments) to split a query string into statements and to find
//! keywords outside literals, without allocating.
//!
//! It is written by hand because the classification fast path must not
//! tokenize into owned tokens, which is what `sqlparser`'s tokenizer does.

use crate::StatementClass;

/// One lexical token, as a byte range into the scanned text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// An unquoted word: keyword or identifier.
    Word(usize, usize),
    /// Any other single significant character (operators, `;`, parens).
    Punct(u8),
    /// A literal, quoted identifier or parameter; its content never matters here.
    Opaque,
}

/// Walks the significant tokens of SQL text, skipping white space and comments.
struct Scanner<'a> {
    text: &'a [u8],
    pos: usize,
}

fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_word_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Self {
        Scanner {
            text: text.as_bytes(),
            pos: 0,
        }
    }

    fn peek(&self, offset: usize) -> Option<u8> {
        self.text.get(self.pos + offset).copied()
    }

    /// Skip white space and comments; returns false at end of text.
    fn skip_insignificant(&mut self) -> bool {
        loop {
            match self.peek(0) {
                None => return false,
                Some(b) if b.is_ascii_whitespace() => self.pos += 1,
                Some(b'-') if self.peek(1) == Some(b'-') => {
                    while let Some(b) = self.peek(0) {
                        self.pos += 1;
                        if b == b'\n' {
                            break;
                        }
                    }
                }
                Some(b'/') if self.peek(1) == Some(b'*') => {
                    self.pos += 2;
                    let mut depth = 1usize;
                    while depth > 0 {
                        match (self.peek(0), self.peek(1)) {
                            (None, _) => return false,
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.pos += 2;
                            }
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.pos += 2;
                            }
                            _ => self.pos += 1,
                        }
                    }
                }
                Some(_) => return true,
            }
        }
    }

    /// Skip a quoted run that ends at `quote`, where a doubled quote is an
    /// escaped one and, if `backslash`, a backslash escapes the next byte.
    fn skip_quoted(&mut self, quote: u8, backslash: bool) {
        self.pos += 1;
        while let Some(b) = self.peek(0) {
            self.pos += 1;
            if backslash && b == b'\\' {
                self.pos += 1;
            } else if b == quote {
                if self.peek(0) == Some(quote) {
                    self.pos += 1;
                } else {
                    return;
                }
            }
        }
        self.pos = self.pos.min(self.text.len());
    }

    /// At a `$`: skip a dollar-quoted string if one starts here.
    fn try_skip_dollar_quote(&mut self) -> bool {
        let start = self.pos;
        let mut end = start + 1;
        if self.text.get(end).is_some_and(|&b| is_word_start(b)) {
            while self
                .text
                .get(end)
                .is_some_and(|&b| is_word_char(b) && b != b'$')
            {
                end += 1;
            }
        }
        if self.text.get(end) != Some(&b'$') {
            return false;
        }
        let tag = &self.text[start..=end];
        let body = end + 1;
        match find(&self.text[body..], tag) {
            Some(offset) => self.pos = body + offset + tag.len(),
            None => self.pos = self.text.len(),
        }
        true
    }

    fn next_token(&mut self) -> Option<Token> {
        if !self.skip_insignificant() {
            return None;
        }
        let start = self.pos;
        let b = self.text[start];
        match b {
            b'\'' => {
                self.skip_quoted(b'\'', false);
                Some(Token::Opaque)
            }
            b'"' => {
                self.skip_quoted(b'"', false);
                Some(Token::Opaque)
            }
            b'$' => {
                if self.try_skip_dollar_quote() {
                } else {
                    // A positional parameter such as $1.
                    self.pos += 1;
                    while self.peek(0).is_some_and(|b| b.is_ascii_digit()) {
                        self.pos += 1;
                    }
                }
                Some(Token::Opaque)
            }
            b if is_word_start(b) => {
                // E'...' is an escape string, where backslash escapes.
                if (b == b'e' || b == b'E') && self.peek(1) == Some(b'\'') {
                    self.pos += 1;
                    self.skip_quoted(b'\'', true);
                    return Some(Token::Opaque);
                }
                while self.peek(0).is_some_and(is_word_char) {
                    self.pos += 1;
                }
                Some(Token::Word(start, self.pos))
            }
            b if b.is_ascii_digit() => {
                while self
                    .peek(0)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
                {
                    self.pos += 1;
                }
                Some(Token::Opaque)
            }
            other => {
                self.pos += 1;
                Some(Token::Punct(other))
            }
        }
    }

    fn word(&self, start: usize, end: usize) -> &'a str {
        // Word boundaries are ASCII bytes or whole UTF-8 sequences (all
        // bytes >= 0x80 are word bytes), so the slice is valid UTF-8.
        std::str::from_utf8(&self.text[start..end]).unwrap_or("")
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Iterator over the statements of a query string, split at top-level `;`.
///
/// Statements are returned without their `;`; statements that hold only
/// white space or comments are skipped. A `;` inside parentheses (as in
/// `CREATE RULE … DO (…; …)`) does not split.
pub struct Statements<'a> {
    text: &'a str,
    pos: usize,
}

/// Whether a statement is inside the SQL-standard body of a routine
/// (`CREATE [OR REPLACE] FUNCTION|PROCEDURE … BEGIN ATOMIC …; …; END`),
/// whose `;` do not end the statement. The same rule as psql's: for such a
/// statement, outside parentheses, BEGIN opens a block, END closes one,
/// and CASE (which also ends with END) opens one inside a block.
#[derive(Default)]
struct RoutineBody {
    /// How many words the statement has had so far.
    words: usize,
    /// The first letter of each of its first four words that is one of
    /// CREATE, OR, REPLACE, FUNCTION, PROCEDURE (0 for another word).
    lead: [u8; 4],
    begin_depth: usize,
}

impl RoutineBody {
    fn word(&mut self, word: &str, paren_depth: usize) {
        if self.words < self.lead.len()
            && ["create", "or", "replace", "function", "procedure"]
                .iter()
                .any(|k| word.eq_ignore_ascii_case(k))
        {
            self.lead[self.words] = word.as_bytes()[0].to_ascii_lowercase();
        }
        self.words += 1;
        let routine = matches!(
            self.lead,
            [b'c', b'f' | b'p', _, _] | [b'c', b'o', b'r', b'f' | b'p']
        );
        if !routine || paren_depth > 0 {
            return;
        }
        if word.eq_ignore_ascii_case("begin")
            || (self.begin_depth > 0 && word.eq_ignore_ascii_case("case"))
        {
            self.begin_depth += 1;
        } else if word.eq_ignore_ascii_case("end") {
            self.begin_depth = self.begin_depth.saturating_sub(1);
        }
    }
}

/// Split a query string into its statements.
pub fn split_statements(text: &str) -> Statements<'_> {
    Statements { text, pos: 0 }
}

impl<'a> Iterator for Statements<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        while self.pos < self.text.len() {
            let rest = &self.text[self.pos..];
            let mut scanner = Scanner::new(rest);
            let mut depth = 0usize;
            let mut routine = RoutineBody::default();
            let mut significant = false;
            let mut end = rest.len();
            while let Some(token) = scanner.next_token() {
                match token {
                    Token::Punct(b';') if depth == 0 && routine.begin_depth == 0 => {
                        end = scanner.pos - 1;
                        break;
                    }
                    Token::Punct(b'(') => depth += 1,
                    Token::Punct(b')') => depth = depth.saturating_sub(1),
                    Token::Word(start, end) => routine.word(scanner.word(start, end), depth),
                    _ => {}
                }
                significant = true;
            }
            let statement = &rest[..end];
            self.pos += (end + 1).min(rest.len());
            if significant {
                return Some(statement);
            }
        }
        None
    }
}

/// The first keyword of a statement and the text after it.
///
/// Leading white space, comments and opening parentheses are skipped (so
/// `(SELECT 1)` starts with `SELECT`). Returns `None` when the statement has
/// no significant token at all, and an empty keyword when it starts with
/// something that is not a word.
pub fn first_keyword(statement: &str) -> Option<(&str, &str)> {
    let mut scanner = Scanner::new(statement);
    loop {
        let before = scanner.pos;
        match scanner.next_token()? {
            Token::Punct(b'(') => continue,
            Token::Word(start, end) => {
                return Some((scanner.word(start, end), &statement[end..]));
            }
            _ => return Some(("", &statement[before..])),
        }
    }
}

/// What a lexical scan of a `SELECT`, `VALUES` or `TABLE` statement found
/// that may make it more than a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteHint {
    /// Nothing: a plain read.
    None,
    /// `INTO`: maybe `SELECT … INTO new_table`.
    Into,
    /// A locking clause (`FOR UPDATE`, `FOR SHARE`, …) or a call of a
    /// function known to write (`nextval`, `setval`, the large-object writers).
    Writes,
}

/// Scan a `SELECT`, `VALUES` or `TABLE` statement for words that need a
/// full parse to settle what it does.
pub(crate) fn write_hint(rest: &str) -> WriteHint {
    let mut scanner = Scanner::new(rest);
    let mut after_for = false;
    let mut hint = WriteHint::None;
    while let Some(token) = scanner.next_token() {
        let Token::Word(start, end) = token else {
            after_for = false;
            continue;
        };
        let word = scanner.word(start, end);
        if after_for
            && ["UPDATE", "SHARE", "NO", "KEY"]
                .iter()
                .any(|w| word.eq_ignore_ascii_case(w))
        {
            return WriteHint::Writes;
        }
        after_for = word.eq_ignore_ascii_case("FOR");
        if WRITING_WORDS.iter().any(|w| word.eq_ignore_ascii_case(w)) {
            return WriteHint::Writes;
        }
        if word.eq_ignore_ascii_case("INTO") {
            hint = WriteHint::Into;
        }
    }
    hint
}

/// Words that make a `SELECT` worth a full parse.
const WRITING_WORDS: &[&str] = &[
    "NEXTVAL",
    "SETVAL",
    "LO_CREAT",
    "LO_CREATE",
    "LO_IMPORT",
    "LO_UNLINK",
    "LO_PUT",
    "LO_FROM_BYTEA",
    "LO_TRUNCATE",
    "LO_TRUNCATE64",
    "LOWRITE",
];

/// The words outside parentheses, each with the byte offset just after it.
fn top_level_words(text: &str) -> impl Iterator<Item = (&str, usize)> {
    let mut scanner = Scanner::new(text);
    let mut depth = 0usize;
    std::iter::from_fn(move || {
        while let Some(token) = scanner.next_token() {
            match token {
                Token::Punct(b'(') => depth += 1,
                Token::Punct(b')') => depth = depth.saturating_sub(1),
                Token::Word(start, end) if depth == 0 => {
                    return Some((scanner.word(start, end), end))
                }
                _ => {}
            }
        }
        None
    })
}

/// `COPY … FROM` writes and `COPY … TO` reads; decided by the first `FROM`
/// or `TO` outside parentheses (a `COPY (query) TO` names its query in
/// parentheses).
pub(crate) fn copy_direction(rest: &str) -> StatementClass {
    for (word, _) in top_level_words(rest) {
        if word.eq_ignore_ascii_case("FROM") {
            return StatementClass::Write;
        }
        if word.eq_ignore_ascii_case("TO") {
            return StatementClass::Read;
        }
    }
    StatementClass::Unknown
}

/// The text after the first top-level word `keyword`.
pub(crate) fn after_top_level_word<'a>(rest: &'a str, keyword: &str) -> Option<&'a str> {
    top_level_words(rest)
        .find(|(word, _)| word.eq_ignore_ascii_case(keyword))
        .map(|(_, end)| &rest[end..])
}

/// For `PREPARE name [(types)] AS statement`: the statement.
pub(crate) fn after_keyword_as(rest: &str) -> Option<&str> {
    after_top_level_word(rest, "AS")
}

/// For `DECLARE name … CURSOR … FOR query`: the query.
pub(crate) fn after_keyword_for(rest: &str) -> Option<&str> {
    after_top_level_word(rest, "FOR")
}

/// Whether `word` occurs as a word (outside literals and comments).
pub(crate) fn contains_word(rest: &str, word: &str) -> bool {
    let mut scanner = Scanner::new(rest);
    while let Some(token) = scanner.next_token() {
        if let Token::Word(start, end) = token {
            if scanner.word(start, end).eq_ignore_ascii_case(word) {
                return true;
            }
        }
    }
    false
}

/// Whether any of `words` (upper case) occurs in `text` as a word, read
/// without regard to literals, quoted names or comments: for the body of a
/// `DO` block, which is itself a literal (any mention counts).
pub(crate) fn mentions_any(text: &str, words: &[&str]) -> bool {
    text.as_bytes()
        .split(|&b| !is_word_char(b) || b == b'$')
        .any(|w| {
            words
                .iter()
                .any(|word| w.eq_ignore_ascii_case(word.as_bytes()))
        })
}

/// For `EXPLAIN [ANALYZE] [VERBOSE] [(options)] statement`: whether the
/// statement is a `CREATE` (`CREATE TABLE … AS`, `CREATE MATERIALIZED
/// VIEW`), which sqlparser does not parse after EXPLAIN.
pub(crate) fn explains_create(rest: &str) -> bool {
    top_level_words(rest)
        .map(|(word, _)| word)
        .find(|word| {
            !["ANALYZE", "ANALYSE", "VERBOSE"]
                .iter()
                .any(|option| word.eq_ignore_ascii_case(option))
        })
        .is_some_and(|word| word.eq_ignore_ascii_case("CREATE"))
}
