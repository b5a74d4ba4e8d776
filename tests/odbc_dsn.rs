//! A map opened through an ODBC data source name, as users set them up in `odbc.ini`
//! (`scripts/servers.sh` writes one, `wth_postgres`, and exports `WTH_ODBC_DSN`).
#![cfg(feature = "odbc")]

use write_thru_hash::DbHashMap;

#[test]
fn odbc_postgres_through_a_dsn() {
    let dsn = std::env::var("WTH_ODBC_DSN")
        .expect("WTH_ODBC_DSN is not set: run `bash scripts/test.sh`, which writes the DSN");
    let url = format!("odbc:{dsn}");
    let table = format!("dsn test {}", std::process::id());
    let mut h: DbHashMap<String, Vec<u8>> =
        DbHashMap::builder_url(&url).table(&table).open().unwrap();
    assert_eq!(h.backend(), "PostgreSQL (ODBC)");
    h.insert("k".into(), vec![0, 1, 2, 255]).unwrap();
    let again: DbHashMap<String, Vec<u8>> =
        DbHashMap::builder_url(&url).table(&table).open().unwrap();
    assert_eq!(again, h);
    let err = DbHashMap::<String, i64>::open_url("odbc:DSN=no_such_dsn;Pwd=hunter2").unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(err.to_string().contains("no_such_dsn"), "{err}");
}
