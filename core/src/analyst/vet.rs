//! What an analyst's SQL may be: exactly one query — `SELECT …`, or `WITH … SELECT …` —
//! over the analyst tables ([`super::TABLES`]) and the query's own named subqueries, with
//! nothing in it that reads or writes elsewhere (table functions, other databases, `system`,
//! files, URLs), runs something other than a query (DDL, DML, `SET`, `SYSTEM`, `KILL`,
//! `EXPLAIN`, `COPY`, several statements) or changes how the engine runs it (`SETTINGS`,
//! `FORMAT`, `INTO OUTFILE`). Everything else is refused here, before any engine sees it.
//!
//! The text is parsed with the parser DataFusion plans with (sqlparser), in the dialect of
//! the engine that runs it, and what passes is what runs: DataFusion plans the vetted tree
//! itself, and the ClickHouse warehouse sends the tree rendered back to text, never the
//! caller's text. So the checks below are about the tree, and the tokens are checked for
//! what could make the rendered text mean something else to ClickHouse's own lexer
//! (quoted identifiers with escapes, string literal kinds other than `'…'`).

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, JoinOperator, ObjectName, Query, Select, Statement, TableFactor, Visit, Visitor,
};
use sqlparser::dialect::Dialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::{invalid, not_allowed, table, table_names};
use crate::problem::Problem;

/// How deep the parser may nest (expressions, subqueries) before it refuses the text.
const RECURSION_LIMIT: usize = 64;

/// The first words of statements other than queries (in any dialect tally parses): a text
/// that starts with one is refused as not allowed even when it does not parse.
const STATEMENTS: &[&str] = &[
    "ALTER",
    "ANALYZE",
    "ATTACH",
    "BEGIN",
    "CACHE",
    "CALL",
    "CHECK",
    "COMMIT",
    "COPY",
    "CREATE",
    "DEALLOCATE",
    "DECLARE",
    "DELETE",
    "DESC",
    "DESCRIBE",
    "DETACH",
    "DROP",
    "EXCHANGE",
    "EXECUTE",
    "EXISTS",
    "EXPLAIN",
    "FLUSH",
    "GRANT",
    "INSERT",
    "INSTALL",
    "KILL",
    "LOAD",
    "LOCK",
    "MERGE",
    "MOVE",
    "OPTIMIZE",
    "PRAGMA",
    "PREPARE",
    "RELEASE",
    "RENAME",
    "REPLACE",
    "RESET",
    "REVOKE",
    "ROLLBACK",
    "SAVEPOINT",
    "SET",
    "SHOW",
    "START",
    "SYSTEM",
    "TRUNCATE",
    "UNDROP",
    "UNLOAD",
    "UNLOCK",
    "UPDATE",
    "UPSERT",
    "USE",
    "VACUUM",
    "WATCH",
];

/// Functions that reach outside the analyst tables or the query (files, URLs, other
/// servers, dictionaries and tables by name, settings) or only make a query slow, compared
/// lowercase. Table functions are refused wherever they appear as tables; these are the
/// names that also exist, or could be written, as scalar functions.
const DENIED_FUNCTIONS: &[&str] = &[
    "file",
    "url",
    "urlcluster",
    "s3",
    "s3cluster",
    "gcs",
    "hdfs",
    "hdfscluster",
    "azureblobstorage",
    "remote",
    "remotesecure",
    "cluster",
    "clusterallreplicas",
    "mysql",
    "postgresql",
    "sqlite",
    "jdbc",
    "odbc",
    "mongodb",
    "redis",
    "input",
    "executable",
    "getsetting",
    "getsettingordefault",
    "sleep",
    "sleepeachrow",
    "joinget",
    "joingetornull",
    "filesystemavailable",
    "filesystemcapacity",
    "filesystemunreserved",
];

/// Prefixes of denied function names (`dictGet`, `dictGetString`, `dictHas`, …).
const DENIED_PREFIXES: &[&str] = &["dict"];

/// Parses `sql` in `dialect` and returns its one query if analysts may run it; otherwise
/// the problem: `sql-invalid` (with the parser's message) or `sql-not-allowed` (naming what
/// is refused).
pub fn vet(sql: &str, dialect: &dyn Dialect) -> Result<Query, Problem> {
    let tokens = Tokenizer::new(dialect, sql)
        .tokenize()
        .map_err(|err| invalid(format!("the query cannot be read: {err}")))?;
    check_tokens(&tokens)?;
    let statements = Parser::new(dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .with_tokens(tokens.clone())
        .parse_statements()
        .map_err(|err| match first_word(&tokens) {
            Some(word) if STATEMENTS.contains(&word.as_str()) => not_a_query(&word),
            _ => refused_clause(&tokens)
                .unwrap_or_else(|| invalid(format!("the query cannot be parsed: {err}"))),
        })?;
    let mut statements = statements.into_iter();
    let (Some(statement), None) = (statements.next(), statements.next()) else {
        return Err(if first_word(&tokens).is_none() {
            invalid("the query is empty")
        } else {
            not_allowed("send one statement at a time: a single SELECT or WITH … SELECT query")
        });
    };
    let Statement::Query(query) = statement else {
        let word = first_word(&tokens).unwrap_or_else(|| "that".into());
        return Err(not_a_query(&word));
    };
    let mut ctes = CteNames::default();
    let _ = query.visit(&mut ctes);
    let mut policy = Policy {
        ctes: ctes.0,
        array_joined: HashSet::new(),
    };
    match query.visit(&mut policy) {
        ControlFlow::Break(problem) => Err(problem),
        ControlFlow::Continue(()) => Ok(*query),
    }
}

fn not_a_query(word: &str) -> Problem {
    not_allowed(format!(
        "only a SELECT (or WITH … SELECT) query runs here, not {word}: the SQL endpoint reads the analyst tables and changes nothing"
    ))
}

/// The first keyword or name of the text, uppercased: what kind of statement it is.
fn first_word(tokens: &[Token]) -> Option<String> {
    tokens.iter().find_map(|token| match token {
        Token::Word(word) => Some(word.value.to_uppercase()),
        Token::Whitespace(_) | Token::LParen => None,
        _ => Some(String::new()),
    })
}

/// For text the parser could not read: the refusal of a ClickHouse clause it may not know
/// in every position (`FORMAT x`, `SETTINGS x = …`), which is a clearer answer than the
/// parser's.
fn refused_clause(tokens: &[Token]) -> Option<Problem> {
    let words: Vec<&Token> = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    words.windows(2).find_map(|pair| {
        let (Token::Word(word), Token::Word(_)) = (pair[0], pair[1]) else {
            return None;
        };
        if word.quote_style.is_some() {
            return None;
        }
        match word.value.to_uppercase().as_str() {
            "FORMAT" => Some(not_allowed(
                "FORMAT is not allowed: ask for JSON, CSV, NDJSON or Parquet with the Accept header",
            )),
            "SETTINGS" => Some(not_allowed(
                "SETTINGS is not allowed: the service sets the limits every query runs under",
            )),
            _ => None,
        }
    })
}

/// Refuses tokens whose meaning could differ between this parser and the engine's lexer,
/// and `INTO OUTFILE` (a ClickHouse clause this parser does not know).
fn check_tokens(tokens: &[Token]) -> Result<(), Problem> {
    let words: Vec<&Token> = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    for (i, token) in words.iter().enumerate() {
        match token {
            Token::Word(word) => {
                if let Some(quote) = word.quote_style {
                    let unsafe_char = word.value.chars().find(|c| {
                        *c == '\\' || *c == '"' || *c == '`' || *c == quote || c.is_control()
                    });
                    if let Some(c) = unsafe_char {
                        return Err(not_allowed(format!(
                            "quoted names may not contain {c:?}: name columns and aliases with letters, digits and spaces"
                        )));
                    }
                }
                let next_is = |keyword: &str| matches!(words.get(i + 1), Some(Token::Word(next)) if next.value.eq_ignore_ascii_case(keyword));
                if word.keyword == Keyword::INTO && (next_is("OUTFILE") || next_is("DUMPFILE")) {
                    return Err(not_allowed(
                        "INTO OUTFILE writes a file on the server; ask for CSV, NDJSON or Parquet with the Accept header instead",
                    ));
                }
            }
            Token::Placeholder(name) => {
                return Err(not_allowed(format!(
                    "query parameters ({name}) are not supported: write values into the query"
                )))
            }
            Token::LBrace | Token::RBrace => {
                return Err(not_allowed(
                    "braces are not allowed (ClickHouse query parameters are not supported)",
                ))
            }
            Token::SingleQuotedString(_)
            | Token::Number(_, _)
            | Token::Char(_)
            | Token::Comma
            | Token::Whitespace(_)
            | Token::EOF => {}
            other if is_string_literal(other) => {
                return Err(not_allowed(format!(
                    "write string literals in single quotes ('…'), not as {other}"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_string_literal(token: &Token) -> bool {
    matches!(
        token,
        Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::QuoteDelimitedStringLiteral(_)
            | Token::NationalQuoteDelimitedStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
    )
}

/// The names of every `WITH` subquery of the statement, lowercase.
#[derive(Default)]
struct CteNames(HashSet<String>);

impl Visitor for CteNames {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.0.insert(cte.alias.name.value.to_lowercase());
            }
        }
        ControlFlow::Continue(())
    }
}

/// The checks on the tree.
///
/// A table name passes when it is an analyst table or the name of one of the statement's
/// `WITH` subqueries. That a name of the second kind is used where its subquery is in scope
/// is the engine's to resolve: DataFusion's context holds only the analyst tables, and the
/// ClickHouse warehouse replaces each subquery name itself and checks again what is left.
struct Policy {
    ctes: HashSet<String>,
    /// The right-hand sides of ClickHouse `ARRAY JOIN`s, which name array columns, not
    /// tables (by address: the tree is not changed while it is checked).
    array_joined: HashSet<*const TableFactor>,
}

fn refuse(problem: Problem) -> ControlFlow<Problem> {
    ControlFlow::Break(problem)
}

impl Visitor for Policy {
    type Break = Problem;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Problem> {
        if query.settings.is_some() {
            return refuse(not_allowed(
                "SETTINGS is not allowed: the service sets the limits every query runs under",
            ));
        }
        if query.format_clause.is_some() {
            return refuse(not_allowed(
                "FORMAT is not allowed: ask for JSON, CSV, NDJSON or Parquet with the Accept header",
            ));
        }
        if !query.locks.is_empty() || query.for_clause.is_some() {
            return refuse(not_allowed(
                "FOR UPDATE/SHARE/XML/JSON clauses are not allowed",
            ));
        }
        if !query.pipe_operators.is_empty() {
            return refuse(not_allowed("pipe syntax (|>) is not supported"));
        }
        if query.with.as_ref().is_some_and(|with| with.recursive) {
            return refuse(not_allowed("WITH RECURSIVE is not supported"));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<Problem> {
        if select.into.is_some() {
            return refuse(not_allowed(
                "SELECT … INTO creates a table; the SQL endpoint changes nothing",
            ));
        }
        if !select.lateral_views.is_empty()
            || !select.cluster_by.is_empty()
            || !select.distribute_by.is_empty()
            || !select.sort_by.is_empty()
            || !select.connect_by.is_empty()
            || select.value_table_mode.is_some()
        {
            return refuse(not_allowed(
                "that clause is not supported; use the portable subset (docs/SQL.md)",
            ));
        }
        for from in &select.from {
            for join in &from.joins {
                if matches!(
                    join.join_operator,
                    JoinOperator::ArrayJoin
                        | JoinOperator::LeftArrayJoin
                        | JoinOperator::InnerArrayJoin
                ) {
                    self.array_joined
                        .insert(&join.relation as *const TableFactor);
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<Problem> {
        if self.array_joined.contains(&(factor as *const TableFactor)) {
            return ControlFlow::Continue(());
        }
        match factor {
            TableFactor::Table {
                name,
                args,
                with_hints,
                version,
                with_ordinality,
                partitions,
                json_path,
                index_hints,
                ..
            } => {
                if args.is_some() {
                    return refuse(not_allowed(format!(
                        "table functions such as {name}(…) are not allowed: query the analyst tables ({})",
                        table_names()
                    )));
                }
                if !with_hints.is_empty()
                    || version.is_some()
                    || *with_ordinality
                    || !partitions.is_empty()
                    || json_path.is_some()
                    || !index_hints.is_empty()
                {
                    return refuse(not_allowed(format!(
                        "table hints and modifiers on {name} are not supported"
                    )));
                }
                self.check_table_name(name)
            }
            TableFactor::Derived { lateral, .. } => {
                if *lateral {
                    return refuse(not_allowed("LATERAL subqueries are not supported"));
                }
                ControlFlow::Continue(())
            }
            TableFactor::NestedJoin { .. } => ControlFlow::Continue(()),
            other => {
                let text = other.to_string();
                let shown: String = text.chars().take(40).collect();
                refuse(not_allowed(format!(
                    "`{shown}` is not a table analysts may read: query the analyst tables ({})",
                    table_names()
                )))
            }
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<Problem> {
        if let Expr::Function(function) = expr {
            if function.name.0.len() != 1 {
                return refuse(not_allowed(format!(
                    "functions are called by their name alone, not {}",
                    function.name
                )));
            }
            let name = function.name.0[0]
                .as_ident()
                .map(|ident| ident.value.to_lowercase())
                .unwrap_or_default();
            if DENIED_FUNCTIONS.contains(&name.as_str())
                || DENIED_PREFIXES
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
            {
                return refuse(not_allowed(format!(
                    "the function {} is not allowed: it reaches outside the analyst tables or holds the query up",
                    function.name
                )));
            }
        }
        ControlFlow::Continue(())
    }
}

impl Policy {
    fn check_table_name(&self, name: &ObjectName) -> ControlFlow<Problem> {
        if name.0.len() != 1 {
            return refuse(not_allowed(format!(
                "tables are named without a database or schema: write ballots, not {name}; the analyst tables are {}",
                table_names()
            )));
        }
        let Some(ident) = name.0[0].as_ident() else {
            return refuse(not_allowed(format!("{name} is not a table name")));
        };
        if table(&ident.value).is_some() || self.ctes.contains(&ident.value.to_lowercase()) {
            return ControlFlow::Continue(());
        }
        refuse(not_allowed(format!(
            "there is no analyst table {name}: the analyst tables are {} (lowercase)",
            table_names()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::{ClickHouseDialect, GenericDialect};

    fn slug(sql: &str) -> String {
        match vet(sql, &ClickHouseDialect {}) {
            Ok(_) => "ok".into(),
            Err(problem) => problem.slug().to_owned(),
        }
    }

    fn generic(sql: &str) -> String {
        match vet(sql, &GenericDialect {}) {
            Ok(_) => "ok".into(),
            Err(problem) => problem.slug().to_owned(),
        }
    }

    #[test]
    fn one_query_over_the_analyst_tables_passes() {
        for sql in [
            "SELECT count(*) FROM ballots",
            "select country, count(*) from ballots where poll_id = 'p' group by country order by 2 desc limit 5",
            "WITH b AS (SELECT * FROM ballots) SELECT count(*) FROM b",
            "SELECT o.label, count(*) FROM answers a JOIN poll_options o ON o.poll_id = a.poll_id AND o.option_id = a.option_id GROUP BY o.label",
            "SELECT * FROM (SELECT poll_id FROM polls) AS p WHERE p.poll_id IN (SELECT poll_id FROM ballots)",
            "SELECT date_trunc('hour', received_at) AS h, count(*) FROM ballots GROUP BY h",
            "SELECT count(DISTINCT voter_key) FROM ballots;",
        ] {
            assert_eq!(slug(sql), "ok", "{sql}");
            assert_eq!(generic(sql), "ok", "{sql}");
        }
        assert_eq!(
            slug("SELECT vote_id, c FROM ballots ARRAY JOIN choices AS c"),
            "ok",
            "the right side of ARRAY JOIN is a column"
        );
    }

    #[test]
    fn statements_other_than_one_query_are_not_allowed() {
        for sql in [
            "INSERT INTO ballots SELECT * FROM ballots",
            "DROP TABLE votes",
            "ALTER TABLE votes DELETE WHERE 1",
            "CREATE TABLE x (a Int32) ENGINE = Memory",
            "TRUNCATE TABLE votes",
            "SET max_execution_time = 0",
            "SET readonly = 0",
            "SYSTEM SHUTDOWN",
            "SYSTEM DROP DNS CACHE",
            "KILL QUERY WHERE 1",
            "OPTIMIZE TABLE votes FINAL",
            "SHOW TABLES",
            "EXPLAIN SELECT 1",
            "DESCRIBE TABLE votes",
            "USE system",
            "GRANT ALL ON *.* TO x",
            "SELECT 1; SELECT 2",
            "SELECT 1; DROP TABLE votes",
            "DELETE FROM votes WHERE 1",
            "UPDATE votes SET poll_id = 'x'",
            "COPY ballots TO '/tmp/x'",
        ] {
            assert_eq!(slug(sql), "sql-not-allowed", "{sql}");
            assert_eq!(generic(sql), "sql-not-allowed", "{sql}");
        }
    }

    #[test]
    fn reading_outside_the_analyst_tables_is_not_allowed() {
        for sql in [
            "SELECT * FROM votes",
            "SELECT * FROM tally.ballots",
            "SELECT * FROM system.numbers",
            "SELECT * FROM system.processes",
            "SELECT * FROM numbers(1000000000000)",
            "SELECT * FROM url('http://127.0.0.1:1/', CSV, 'a String')",
            "SELECT * FROM file('/etc/passwd', CSV, 'a String')",
            "SELECT * FROM remote('127.0.0.1', system.one)",
            "SELECT * FROM ballots WHERE poll_id IN (SELECT name FROM system.tables)",
            "SELECT (SELECT count() FROM vote_windows)",
            "WITH x AS (SELECT * FROM segment_rollups) SELECT * FROM x",
            "SELECT * FROM ballots JOIN schema_migrations ON 1 = 1",
            "SELECT dictGetString('d', 'a', toUInt64(1))",
            "SELECT file('x')",
            "SELECT getSetting('readonly')",
            "SELECT sleep(3)",
            "SELECT 1 FROM ballots SETTINGS max_execution_time = 0",
            "SELECT 1 FORMAT TabSeparated",
            "SELECT * FROM ballots INTO OUTFILE '/tmp/x'",
            "SELECT * INTO copy FROM ballots",
            "WITH RECURSIVE r AS (SELECT 1) SELECT * FROM r",
            "SELECT * FROM BALLOTS",
        ] {
            assert_eq!(slug(sql), "sql-not-allowed", "{sql}");
        }
        for sql in [
            "SELECT * FROM generate_series(1, 10)",
            "SELECT * FROM range(1000000000000)",
            "SELECT * FROM datafusion.public.ballots",
            "SELECT * FROM information_schema.tables",
            "SELECT * FROM 'ballots.parquet'",
            "SELECT * FROM ballots WHERE poll_id = $1",
        ] {
            assert_ne!(generic(sql), "ok", "{sql}");
        }
    }

    #[test]
    fn text_that_could_read_differently_to_clickhouse_is_refused() {
        assert_eq!(slug(r#"SELECT 1 AS "a\" FROM ballots"#), "sql-not-allowed");
        assert_eq!(slug("SELECT 1 AS `a\\` FROM ballots"), "sql-not-allowed");
        assert_eq!(slug("SELECT {x:UInt8}"), "sql-not-allowed");
        assert_eq!(slug("SELECT 'it''s', 'a\\'b' FROM ballots"), "ok");
    }

    #[test]
    fn nonsense_is_invalid_with_the_parser_message() {
        let problem = vet("SELECT FROM WHERE", &ClickHouseDialect {}).unwrap_err();
        assert_eq!(
            slug("SELEC 1"),
            "sql-invalid",
            "a typo is not a refused statement"
        );
        assert_eq!(problem.slug(), "sql-invalid");
        assert!(problem.detail.contains("parsed"), "{}", problem.detail);
        assert_eq!(slug(""), "sql-invalid");
        assert_eq!(slug("   -- nothing"), "sql-invalid");
    }
}
