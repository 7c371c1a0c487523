//! An analyst's SQL on ClickHouse: vetted ([`tally_core::analyst::vet`]), then rewritten
//! for the engine and rendered back to text — the caller's text never reaches the server.
//!
//! The rewrites, on the vetted tree:
//! 1. `WITH` subqueries are put in place of their names (ClickHouse 18.16 has no
//!    `WITH x AS (SELECT …)`), each name resolved in the scope SQL gives it; then every
//!    table name left must be an analyst table (whatever the rewrite did, no other name
//!    reaches the server).
//! 2. The tables of counted votes become their view's body over `votes` with each
//!    partition pinned to the position the query was given ([`sql::pinned`]), so one
//!    answer is exact as of one position even while votes are inserted.
//! 3. `date_trunc('<unit>', t)` — the documented portable truncation — becomes ClickHouse's
//!    `toStartOf…`, returning a `DateTime` in UTC like DataFusion's does.
//! 4. A table on the side of an outer join that may be NULL (the right of a `LEFT JOIN`,
//!    either side of a `FULL JOIN`, …) keeps only its columns that are not arrays: with
//!    `join_use_nulls` (NULL, as in DataFusion, where nothing matched) ClickHouse 18.16
//!    would make every column of that side Nullable, and an array cannot be.
//! 5. String literals have their backslashes escaped: the parser read them with
//!    ClickHouse's escapes, and the renderer only doubles quotes, so the server reads each
//!    literal's value exactly as it was vetted. (Quoted names that could read differently
//!    were refused by the vetting.)

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments, Ident,
    JoinOperator, ObjectName, Query, Select, TableAlias, TableFactor, Value, Visit, VisitMut,
    Visitor, VisitorMut,
};
use sqlparser::dialect::ClickHouseDialect;
use sqlparser::parser::Parser;
use tally_core::analyst::{self, vet::vet};
use tally_core::problem::Problem;

use crate::sql;

/// The query ClickHouse runs for the analyst query `text`, with the tables of counted
/// votes pinned to `positions` (partition, sequence).
pub fn render(text: &str, positions: &[(u16, u64)]) -> Result<String, Problem> {
    let mut query = vet(text, &ClickHouseDialect {})?;
    let mut inliner = Inliner::default();
    flow(VisitMut::visit(&mut query, &mut inliner))?;
    flow(query.visit(&mut OnlyAnalystTables::default()))?;
    let mut rewriter = Rewriter {
        positions,
        array_joined: HashSet::new(),
        nullable_side: HashSet::new(),
    };
    flow(VisitMut::visit(&mut query, &mut rewriter))?;
    flow(VisitMut::visit(&mut query, &mut EscapeLiterals))?;
    Ok(query.to_string())
}

fn flow(outcome: ControlFlow<Problem>) -> Result<(), Problem> {
    match outcome {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(problem) => Err(problem),
    }
}

/// The right-hand sides of `ARRAY JOIN`s in `select`: array columns, not tables.
fn array_joined(select: &Select) -> impl Iterator<Item = *const TableFactor> + '_ {
    select.from.iter().flat_map(|from| {
        from.joins
            .iter()
            .filter(|join| {
                matches!(
                    join.join_operator,
                    JoinOperator::ArrayJoin
                        | JoinOperator::LeftArrayJoin
                        | JoinOperator::InnerArrayJoin
                )
            })
            .map(|join| &join.relation as *const TableFactor)
    })
}

/// The single, unquoted-or-not name of a table factor, when it names a table.
fn table_name(factor: &TableFactor) -> Option<&Ident> {
    let TableFactor::Table {
        name, args: None, ..
    } = factor
    else {
        return None;
    };
    match name.0.as_slice() {
        [part] => part.as_ident(),
        _ => None,
    }
}

/// Puts each `WITH` subquery in place of its name (see the module documentation).
#[derive(Default)]
struct Inliner {
    /// Named subqueries in scope, innermost last: (lowercase name, body already inlined).
    scopes: Vec<Vec<(String, Query)>>,
    /// Per query being visited: whether it opened a scope.
    opened: Vec<bool>,
    array_joined: HashSet<*const TableFactor>,
}

impl Inliner {
    fn lookup(&self, name: &str) -> Option<&Query> {
        let name = name.to_lowercase();
        self.scopes
            .iter()
            .rev()
            .find_map(|scope| scope.iter().rev().find(|(n, _)| *n == name))
            .map(|(_, body)| body)
    }
}

impl VisitorMut for Inliner {
    type Break = Problem;

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<Problem> {
        let Some(with) = query.with.take() else {
            self.opened.push(false);
            return ControlFlow::Continue(());
        };
        // Each body sees the names before it (and those outside), not its own.
        let mut scope: Vec<(String, Query)> = Vec::new();
        for cte in with.cte_tables {
            if !cte.alias.columns.is_empty() {
                return ControlFlow::Break(analyst::not_allowed(format!(
                    "column lists after WITH names ({}) are not supported on this warehouse; name the columns in the subquery",
                    cte.alias
                )));
            }
            let mut body = *cte.query;
            let mut inner = Inliner {
                scopes: self.scopes.clone(),
                ..Inliner::default()
            };
            inner.scopes.push(scope.clone());
            VisitMut::visit(&mut body, &mut inner)?;
            scope.push((cte.alias.name.value.to_lowercase(), body));
        }
        self.scopes.push(scope);
        self.opened.push(true);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &mut Query) -> ControlFlow<Problem> {
        if self.opened.pop() == Some(true) {
            self.scopes.pop();
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &mut Select) -> ControlFlow<Problem> {
        self.array_joined.extend(array_joined(select));
        ControlFlow::Continue(())
    }

    // After the factor's own children: the body put in is not visited again.
    fn post_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<Problem> {
        if self.array_joined.contains(&(factor as *const TableFactor)) {
            return ControlFlow::Continue(());
        }
        let Some(name) = table_name(factor).cloned() else {
            return ControlFlow::Continue(());
        };
        let Some(body) = self.lookup(&name.value).cloned() else {
            return ControlFlow::Continue(());
        };
        let TableFactor::Table { alias, .. } = factor else {
            return ControlFlow::Continue(());
        };
        *factor = derived(body, alias.take(), name);
        ControlFlow::Continue(())
    }
}

/// `(body) AS alias`, the alias being the table's name when it had none.
fn derived(body: Query, alias: Option<TableAlias>, name: Ident) -> TableFactor {
    let alias = alias.unwrap_or(TableAlias {
        explicit: true,
        name,
        columns: Vec::new(),
        at: None,
    });
    TableFactor::Derived {
        lateral: false,
        subquery: Box::new(body),
        alias: Some(alias),
        sample: None,
    }
}

/// After inlining: every table named is an analyst table.
#[derive(Default)]
struct OnlyAnalystTables {
    array_joined: HashSet<*const TableFactor>,
}

impl Visitor for OnlyAnalystTables {
    type Break = Problem;

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<Problem> {
        self.array_joined.extend(array_joined(select));
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<Problem> {
        if self.array_joined.contains(&(factor as *const TableFactor)) {
            return ControlFlow::Continue(());
        }
        match factor {
            TableFactor::Table { name, .. } => {
                let known = table_name(factor).is_some_and(|n| analyst::table(&n.value).is_some());
                if known {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(analyst::not_allowed(format!(
                        "{name} is not an analyst table here (a WITH name used outside its scope?); the analyst tables are {}",
                        analyst::table_names()
                    )))
                }
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

/// Pins the tables of counted votes, narrows the nullable sides of outer joins and
/// translates `date_trunc`.
struct Rewriter<'a> {
    positions: &'a [(u16, u64)],
    array_joined: HashSet<*const TableFactor>,
    nullable_side: HashSet<*const TableFactor>,
}

/// The table factors of `select` whose rows an outer join may fill with NULL.
fn nullable_sides(select: &Select) -> Vec<*const TableFactor> {
    let mut sides = Vec::new();
    for from in &select.from {
        let mut before: Vec<*const TableFactor> = vec![&from.relation as *const TableFactor];
        for join in &from.joins {
            let this = &join.relation as *const TableFactor;
            match join.join_operator {
                JoinOperator::Left(_) | JoinOperator::LeftOuter(_) => sides.push(this),
                JoinOperator::Right(_) | JoinOperator::RightOuter(_) => {
                    sides.extend(before.iter().copied())
                }
                JoinOperator::FullOuter(_) => {
                    sides.extend(before.iter().copied());
                    sides.push(this);
                }
                _ => {}
            }
            before.push(this);
        }
    }
    sides
}

/// `table`'s columns that are not arrays, as a select list.
fn scalar_columns(table: &str) -> Option<String> {
    let table = analyst::table(table)?;
    let columns: Vec<&str> = table
        .columns
        .iter()
        .filter(|column| !column.ty.starts_with("array("))
        .map(|column| column.name)
        .collect();
    Some(columns.join(", "))
}

impl VisitorMut for Rewriter<'_> {
    type Break = Problem;

    fn pre_visit_select(&mut self, select: &mut Select) -> ControlFlow<Problem> {
        self.array_joined.extend(array_joined(select));
        self.nullable_side.extend(nullable_sides(select));
        ControlFlow::Continue(())
    }

    fn post_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<Problem> {
        if self.array_joined.contains(&(factor as *const TableFactor)) {
            return ControlFlow::Continue(());
        }
        let Some(name) = table_name(factor).cloned() else {
            return ControlFlow::Continue(());
        };
        let table = name.value.to_lowercase();
        let pinned = sql::pinned(&table, self.positions);
        let nullable = self.nullable_side.contains(&(factor as *const TableFactor));
        let body = match (pinned, nullable) {
            (None, false) => return ControlFlow::Continue(()),
            (Some(body), false) => body,
            (pinned, true) => {
                let Some(columns) = scalar_columns(&table) else {
                    return ControlFlow::Continue(());
                };
                let source = match pinned {
                    Some(body) => format!("({body})"),
                    None => table.clone(),
                };
                format!("SELECT {columns} FROM {source}")
            }
        };
        let body = match Parser::new(&ClickHouseDialect {})
            .try_with_sql(&body)
            .and_then(|mut parser| parser.parse_query())
        {
            Ok(body) => *body,
            Err(err) => {
                // Our own text: a failure here is a bug, reported as such.
                tracing::error!(table = %name, error = %err, "cannot parse a pinned analyst table");
                return ControlFlow::Break(Problem::internal());
            }
        };
        let TableFactor::Table { alias, .. } = factor else {
            return ControlFlow::Continue(());
        };
        *factor = derived(body, alias.take(), name);
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Problem> {
        let Expr::Function(function) = expr else {
            return ControlFlow::Continue(());
        };
        let is_date_trunc = function.name.0.len() == 1
            && function.name.0[0]
                .as_ident()
                .is_some_and(|ident| ident.value.eq_ignore_ascii_case("date_trunc"));
        if !is_date_trunc {
            return ControlFlow::Continue(());
        }
        match date_trunc(function) {
            Ok(rewritten) => {
                *expr = rewritten;
                ControlFlow::Continue(())
            }
            Err(problem) => ControlFlow::Break(problem),
        }
    }
}

/// `date_trunc('<unit>', t)` as ClickHouse functions, as a `DateTime` in UTC.
fn date_trunc(function: &Function) -> Result<Expr, Problem> {
    let usage = || {
        analyst::invalid(
            "date_trunc takes a unit in quotes and a timestamp: date_trunc('hour', received_at); units: minute, hour, day, week, month, quarter, year",
        )
    };
    let FunctionArguments::List(list) = &function.args else {
        return Err(usage());
    };
    let [FunctionArg::Unnamed(FunctionArgExpr::Expr(unit)), FunctionArg::Unnamed(FunctionArgExpr::Expr(time))] =
        list.args.as_slice()
    else {
        return Err(usage());
    };
    let Expr::Value(unit) = unit else {
        return Err(usage());
    };
    let Value::SingleQuotedString(unit) = &unit.value else {
        return Err(usage());
    };
    let call = |name: &str, args: Vec<Expr>| -> Expr {
        let mut call = function.clone();
        call.name = ObjectName::from(vec![Ident::new(name)]);
        call.args = FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args: args
                .into_iter()
                .map(|arg| FunctionArg::Unnamed(FunctionArgExpr::Expr(arg)))
                .collect(),
            clauses: Vec::new(),
        });
        Expr::Function(call)
    };
    let utc = Expr::value(Value::SingleQuotedString("UTC".into()));
    let time = time.clone();
    // Days and longer are dates in ClickHouse; made a midnight in UTC again.
    let midnight = |name: &str| {
        call(
            "toDateTime",
            vec![call(name, vec![time.clone()]), utc.clone()],
        )
    };
    Ok(match unit.to_lowercase().as_str() {
        "minute" => call("toStartOfMinute", vec![time]),
        "hour" => call("toStartOfHour", vec![time]),
        "day" => call("toStartOfDay", vec![time]),
        "week" => midnight("toMonday"),
        "month" => midnight("toStartOfMonth"),
        "quarter" => midnight("toStartOfQuarter"),
        "year" => midnight("toStartOfYear"),
        _ => return Err(usage()),
    })
}

/// Escapes the backslashes of string literals for ClickHouse's lexer (see the module
/// documentation).
struct EscapeLiterals;

impl VisitorMut for EscapeLiterals {
    type Break = Problem;

    fn pre_visit_value(
        &mut self,
        value: &mut sqlparser::ast::ValueWithSpan,
    ) -> ControlFlow<Problem> {
        match &mut value.value {
            Value::SingleQuotedString(text) => {
                if text.contains('\\') {
                    *text = text.replace('\\', "\\\\");
                }
                ControlFlow::Continue(())
            }
            Value::Number(_, _) | Value::Boolean(_) | Value::Null => ControlFlow::Continue(()),
            other => ControlFlow::Break(analyst::not_allowed(format!(
                "the literal {other} is not supported: write strings in single quotes"
            ))),
        }
    }
}

/// Portable analyst queries, rendered, for the dialect check on current ClickHouse.
pub(crate) fn sample_statements() -> Vec<(String, String)> {
    let queries = [
        "SELECT country, count(*) FROM ballots WHERE poll_id = 'p' GROUP BY country ORDER BY country",
        "SELECT o.label, count(*) AS n FROM answers a JOIN poll_options o ON o.poll_id = a.poll_id AND o.option_id = a.option_id WHERE a.poll_id = 'p' GROUP BY o.label ORDER BY n DESC",
        "WITH b AS (SELECT * FROM ballots WHERE poll_id = 'p'), d AS (SELECT * FROM b WHERE country = 'DE') SELECT count(*), count(DISTINCT voter_key) FROM d",
        "SELECT date_trunc('hour', received_at) AS h, count(*) FROM ballots GROUP BY h ORDER BY h",
        "SELECT date_trunc('month', received_at) AS m, min(received_ms), max(seq) FROM ballots GROUP BY m",
        "SELECT d.value, count(*) FROM ballot_dimensions d WHERE d.dimension = 'plan' GROUP BY d.value HAVING count(*) > 0",
        "SELECT p.title, b.n FROM polls p JOIN (SELECT poll_id, count(*) AS n FROM ballots GROUP BY poll_id) b ON b.poll_id = p.poll_id",
        "SELECT avg(rating), sum(rating), min(received_at) FROM ballots WHERE rating IS NOT NULL",
        "SELECT vote_id FROM ballots WHERE country IN ('DE', 'it''s', 'back\\slash') LIMIT 10",
        "SELECT p.title, count(b.vote_id) AS n FROM polls p LEFT JOIN ballots b ON b.poll_id = p.poll_id GROUP BY p.title",
    ];
    queries
        .iter()
        .map(|text| {
            let rendered = render(text, &[(0, 7)]).expect("a sample analyst query renders");
            (format!("analyst query: {text}"), rendered)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(text: &str) -> String {
        render(text, &[(0, 100), (1, 50)]).unwrap_or_else(|p| panic!("{text}: {p:?}"))
    }

    #[test]
    fn counted_vote_tables_are_pinned_per_partition() {
        let sql = rendered("SELECT count(*) FROM ballots AS b WHERE b.poll_id = 'p'");
        assert!(
            sql.contains("FROM votes WHERE seq <= [100, 50][log_partition + 1]"),
            "{sql}"
        );
        assert!(sql.contains(") AS b WHERE b.poll_id = 'p'"), "{sql}");
        let sql = rendered("SELECT option_id FROM answers");
        assert!(
            sql.contains("ARRAY JOIN choice AS option_id WHERE"),
            "{sql}"
        );
        assert!(sql.ends_with("AS answers"), "{sql}");
        let sql = render("SELECT count(*) FROM ballots", &[]).unwrap();
        assert!(sql.contains("WHERE 0"), "no position, no votes: {sql}");
        let sql = rendered("SELECT title FROM polls");
        assert_eq!(
            sql, "SELECT title FROM polls",
            "poll definitions are read as they are"
        );
    }

    #[test]
    fn with_names_are_inlined_in_their_scope() {
        let sql = rendered(
            "WITH a AS (SELECT poll_id FROM ballots), b AS (SELECT * FROM a) SELECT count(*) FROM b",
        );
        assert!(!sql.contains("WITH"), "{sql}");
        assert_eq!(sql.matches("FROM votes").count(), 1, "{sql}");
        // A WITH name that shadows an analyst table, used in its own body, is the table.
        let sql = rendered("WITH ballots AS (SELECT * FROM ballots WHERE country = 'DE') SELECT count(*) FROM ballots");
        assert_eq!(sql.matches("FROM votes").count(), 1, "{sql}");
        // A name used where its subquery is not in scope is left, and refused.
        let problem = render(
            "WITH x AS (SELECT 1) SELECT * FROM (WITH y AS (SELECT * FROM x) SELECT * FROM y) AS z, (SELECT * FROM y) AS w",
            &[(0, 1)],
        )
        .unwrap_err();
        assert_eq!(problem.slug(), "sql-not-allowed", "{problem:?}");
        // A name of an internal table reached through a misplaced WITH name: refused.
        let problem = render(
            "WITH votes AS (SELECT * FROM votes) SELECT * FROM votes",
            &[(0, 1)],
        )
        .unwrap_err();
        assert_eq!(problem.slug(), "sql-not-allowed", "{problem:?}");
    }

    #[test]
    fn the_nullable_side_of_an_outer_join_has_no_arrays() {
        const NARROW_BALLOTS: &str = "(SELECT poll_id, vote_id, log_partition, seq, voter_key, received_at, received_ms, choice, rating, campaign";
        let sql = rendered(
            "SELECT p.title, count(b.vote_id) FROM polls p LEFT JOIN ballots b ON b.poll_id = p.poll_id GROUP BY p.title",
        );
        assert!(
            sql.contains(&format!("FROM polls p LEFT JOIN {NARROW_BALLOTS}")),
            "{sql}"
        );
        let sql =
            rendered("SELECT count(*) FROM ballots b RIGHT JOIN polls p ON b.poll_id = p.poll_id");
        assert!(sql.contains(&format!("FROM {NARROW_BALLOTS}")), "{sql}");
        assert!(sql.contains("RIGHT JOIN polls p"), "{sql}");
        let sql = rendered(
            "SELECT count(*) FROM ballots b FULL OUTER JOIN polls p ON b.poll_id = p.poll_id",
        );
        assert!(sql.contains(&format!("FROM {NARROW_BALLOTS}")), "{sql}");
        assert!(
            sql.contains("JOIN (SELECT poll_id, title,") && !sql.contains("dimensions"),
            "{sql}"
        );
        let sql = rendered("SELECT count(*) FROM ballots b JOIN polls p ON b.poll_id = p.poll_id");
        assert!(
            !sql.contains(NARROW_BALLOTS) && sql.contains("JOIN polls p"),
            "{sql}"
        );
    }

    #[test]
    fn date_trunc_becomes_clickhouse_functions() {
        let sql = rendered(
            "SELECT date_trunc('hour', received_at), DATE_TRUNC('week', received_at) FROM ballots",
        );
        assert!(
            sql.starts_with(
                "SELECT toStartOfHour(received_at), toDateTime(toMonday(received_at), 'UTC')"
            ),
            "{sql}"
        );
        let problem = render(
            "SELECT date_trunc('fortnight', received_at) FROM ballots",
            &[],
        )
        .unwrap_err();
        assert_eq!(problem.slug(), "sql-invalid");
    }

    #[test]
    fn literals_reach_clickhouse_as_they_were_read() {
        let sql = rendered(r"SELECT 'a\\b', 'it''s', 'x\'y' FROM polls");
        assert_eq!(sql, r"SELECT 'a\\b', 'it''s', 'x''y' FROM polls");
    }

    #[test]
    fn the_samples_render() {
        assert!(sample_statements().len() > 5);
    }
}
