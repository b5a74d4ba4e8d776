//! The conformance suite, written once in `suite.rs` and stamped out here for every
//! backend this build has: SQLite always, PostgreSQL and MariaDB with their features,
//! and with `odbc` the same three through their ODBC drivers.

mod env;
mod suite;

macro_rules! conformance {
    ($backend:ident, $env:expr, [$($test:ident),* $(,)?]) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::env::*;
            $(
                #[test]
                fn $test() {
                    let env = $env;
                    super::suite::$test(&env);
                }
            )*
        }
    };
}

macro_rules! all_backends {
    ($($test:ident),* $(,)?) => {
        conformance!(sqlite, SqliteEnv::new(), [$($test),*]);
        #[cfg(feature = "postgres")]
        conformance!(postgres, PgEnv::new(), [$($test),*]);
        #[cfg(feature = "mysql")]
        conformance!(mysql, MyEnv::new(), [$($test),*]);
        #[cfg(feature = "odbc")]
        conformance!(odbc_sqlite, OdbcEnv::sqlite(), [$($test),*]);
        #[cfg(feature = "odbc")]
        conformance!(odbc_postgres, OdbcEnv::postgres(), [$($test),*]);
        #[cfg(feature = "odbc")]
        conformance!(odbc_mysql, OdbcEnv::mysql(), [$($test),*]);
    };
}

all_backends!(
    basic_operations,
    complex_keys_and_values,
    custom_table_name,
    initial_src_then_replace,
    odd_table_names_are_quoted,
    unusable_table_names_are_refused_before_writing,
    keys_compare_byte_for_byte,
    all_write_methods,
    reads_are_hashmap_reads,
    transactions_are_all_or_nothing,
    server_rejection_rolls_back_everything,
    failures_leave_memory_unchanged,
    reload_sees_outside_changes,
    undecodable_rows_are_errors,
    wrong_layout_is_refused,
    non_canonical_key_codec_is_caught,
    codecs_and_column_types,
    long_keys_are_refused_or_stored_whole,
    bad_input_is_refused_cleanly,
    random_operations_match_a_model,
);
