//! No error message and no `Debug` output shows a password from a URL or a
//! connection string, whatever goes wrong with it.

use write_thru_hash::DbHashMap;

fn check(url: &str) {
    let err = DbHashMap::<String, i64>::open_url(url).unwrap_err();
    let (shown, debug) = (err.to_string(), format!("{err:?}"));
    let mut chain = shown.clone();
    let mut next = std::error::Error::source(&err);
    while let Some(cause) = next {
        chain.push_str(&format!(": {cause} ({cause:?})"));
        next = cause.source();
    }
    for text in [&shown, &debug, &chain] {
        assert!(!text.contains("s3cr3tpw"), "{url} -> {text}");
    }
}

#[test]
fn urls_with_passwords_never_show_them() {
    check("nosuch://u:s3cr3tpw@h/db");
    check(
        "sqlite:/nonexistent/dir/s3cr3tpw-is-not-a-password.db"
            .replace("s3cr3tpw-is-not-a-password", "x")
            .as_str(),
    );
    #[cfg(feature = "postgres")]
    {
        check("postgres://u:s3cr3tpw@127.0.0.1:1/db");
        check("postgres://u:s3cr3tpw@127.0.0.1:1/db?bogus=1");
        check("postgres://u:s3cr3tpw@[bad/db");
        check("postgres://127.0.0.1:1/db?password=s3cr3tpw");
    }
    #[cfg(feature = "mysql")]
    {
        check("mysql://u:s3cr3tpw@127.0.0.1:1/db");
        check("mysql://u:s3cr3tpw@127.0.0.1:1/db?bogus=1");
        check("mysql://u:s3cr3tpw@127.0.0.1:1/db?pool_min=x");
        check("mariadb://u:s3cr3tpw@[bad/db");
    }
    // Passwords with the characters that end a URL's authority: drivers read the
    // credentials up to the `@`, so must the redaction.
    #[cfg(feature = "postgres")]
    for url in [
        "postgres://app:s3cr3tpw/2@127.0.0.1:1/db",
        "postgres://app:x/s3cr3tpw@127.0.0.1:1/db",
        "postgres://app:s3cr3tpw?x@127.0.0.1:1/db",
        "postgresql://app:a?b/s3cr3tpw#@127.0.0.1:1/db?sslmode=disable",
        "postgres://app:s3cr3tpw@x@127.0.0.1:1/db",
    ] {
        check(url);
    }
    // A password in the query that holds `@`; a query key the driver percent-decodes.
    #[cfg(feature = "postgres")]
    for url in [
        "postgres://127.0.0.1:1/db?password=a@s3cr3tpw",
        "postgres://127.0.0.1:1/db?user=u&pass%77ord=s3cr3tpw",
    ] {
        check(url);
    }
    #[cfg(feature = "mysql")]
    for url in [
        "mysql://u@127.0.0.1:1/db?password=a@s3cr3tpw",
        "mysql://u:123?s3cr3tpw@127.0.0.1:1/db",
        "mariadb://u:123?s3cr3tpw@127.0.0.1:1/db",
    ] {
        check(url);
    }
    #[cfg(feature = "mysql")]
    for url in [
        "mysql://app:s3cr3tpw/2@127.0.0.1:1/db",
        "mysql://app:x/s3cr3tpw@127.0.0.1:1/db",
        "mysql://app:s3cr3tpw?x@127.0.0.1:1/db",
        "mariadb://app:s3cr3tpw#x@127.0.0.1:1/db",
        "mysql://app:s3cr3tpw@x@127.0.0.1:1/db",
    ] {
        check(url);
    }
    #[cfg(feature = "odbc")]
    {
        check("odbc:Driver={NoSuchDriver};Server=https://h;Uid=u;Pwd=s3cr3tpw;");
        check("odbc:Driver={NoSuchDriver};Uid=u;PWD= {s3cr3tpw;x};");
        check("odbc:Driver={NoSuchDriver};Uid=u;PWD= {a;s3cr3tpw};");
        check("odbc:Driver={NoSuchDriver};Uid=u;Pwd=s3cr3tpw;");
        check("odbc:DSN=nosuch;PWD=s3cr3tpw");
        check("odbc:Driver={NoSuchDriver};Password=s3cr3tpw");
    }
}
