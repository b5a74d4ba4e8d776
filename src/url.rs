//! Database URLs: the scheme picks the backend; a backend whose feature is off gets
//! an error that names the feature to enable.

use crate::error::{redact, Error, Result};
use crate::store::Store;

/// The backend a URL names, and the part after the scheme that the backend reads.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target<'a> {
    Sqlite(&'a str),
    Postgres(&'a str),
    Mysql(&'a str),
    Odbc(&'a str),
}

pub(crate) fn parse(url: &str) -> Result<Target<'_>> {
    let bad = |reason: &str| Error::Url {
        url: redact(url),
        reason: reason.to_string(),
    };
    let (scheme, rest) = url.split_once(':').ok_or_else(|| {
        bad("it has no scheme; use sqlite:PATH, sqlite::memory:, postgres://…, mysql://… or odbc:…")
    })?;
    match scheme.to_ascii_lowercase().as_str() {
        "sqlite" => {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            match path {
                "" => Err(bad("it names no file; use sqlite:PATH or sqlite::memory:")),
                ":memory:" => Ok(Target::Sqlite(":memory:")),
                path => Ok(Target::Sqlite(path)),
            }
        }
        "postgres" | "postgresql" => Ok(Target::Postgres(url)),
        "mysql" | "mariadb" => Ok(Target::Mysql(url)),
        "odbc" if rest.trim().is_empty() => {
            Err(bad("it has no connection string; use odbc:DSN=name or odbc:Driver={…};…"))
        }
        "odbc" => Ok(Target::Odbc(rest)),
        other => Err(bad(&format!(
            "the scheme {other:?} is not one this crate knows; use sqlite:, postgres://, mysql:// or odbc:"
        ))),
    }
}

#[cfg_attr(
    all(feature = "sqlite", feature = "postgres", feature = "mysql"),
    allow(dead_code)
)]
fn feature_off(url: &str, feature: &str) -> Error {
    Error::Url {
        url: redact(url),
        reason: format!(
            "this build of write-thru-hash has no {feature} backend; enable the `{feature}` \
             feature (cargo add write-thru-hash -F {feature})"
        ),
    }
}

/// Connects to the database a URL names.
pub(crate) fn connect(url: &str) -> Result<Box<dyn Store>> {
    match parse(url)? {
        #[cfg(feature = "sqlite")]
        Target::Sqlite(path) => Ok(Box::new(crate::store::sqlite::SqliteStore::open_path(
            std::path::Path::new(path),
        )?)),
        #[cfg(not(feature = "sqlite"))]
        Target::Sqlite(_) => Err(feature_off(url, "sqlite")),
        #[cfg(feature = "postgres")]
        Target::Postgres(u) => Ok(Box::new(crate::store::postgres::PostgresStore::connect(u)?)),
        #[cfg(not(feature = "postgres"))]
        Target::Postgres(_) => Err(feature_off(url, "postgres")),
        #[cfg(feature = "mysql")]
        Target::Mysql(u) => Ok(Box::new(crate::store::mysql::MysqlStore::connect(u)?)),
        #[cfg(not(feature = "mysql"))]
        Target::Mysql(_) => Err(feature_off(url, "mysql")),
        #[cfg(feature = "odbc")]
        Target::Odbc(cs) => Ok(Box::new(crate::store::odbc::OdbcStore::connect(cs)?)),
        #[cfg(not(feature = "odbc"))]
        Target::Odbc(_) => Err(feature_off(url, "odbc")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_pick_backends() {
        assert_eq!(
            parse("sqlite::memory:").unwrap(),
            Target::Sqlite(":memory:")
        );
        assert_eq!(
            parse("sqlite:/tmp/x.db").unwrap(),
            Target::Sqlite("/tmp/x.db")
        );
        assert_eq!(parse("sqlite://rel.db").unwrap(), Target::Sqlite("rel.db"));
        assert_eq!(parse("SQLITE:a b.db").unwrap(), Target::Sqlite("a b.db"));
        assert!(matches!(
            parse("postgresql://u@h/d").unwrap(),
            Target::Postgres(_)
        ));
        assert!(matches!(
            parse("mariadb://u@h/d").unwrap(),
            Target::Mysql(_)
        ));
        assert!(parse("sqlite:").is_err());
        assert!(parse("nothing").is_err());
        let err = parse("redis://u:hunter2@h").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn disabled_backends_name_their_feature() {
        let err = feature_off("mysql://u:pw@h/db", "mysql").to_string();
        assert!(
            err.contains("`mysql` feature") && !err.contains("pw@"),
            "{err}"
        );
    }
}
