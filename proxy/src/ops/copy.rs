//! `chorus join` and `chorus rejoin`: the admin console's `JOIN` and
//! `REJOIN` (see cluster/rejoin) from the command line, sent to the node a
//! configuration file describes, with each step of the copy printed as it
//! comes and, on a terminal, its progress drawn as a bar.

use std::io::{IsTerminal, Write};

use thiserror::Error;

use crate::config::Config;

#[derive(Debug, Error)]
pub enum CopyError {
    #[error("no admin role: name one with --user, or in node.admin_users")]
    NoAdmin,
    #[error("the admin console at {address}: {source}")]
    Connect {
        address: String,
        source: tokio_postgres::Error,
    },
    #[error("{}", crate::backend::error_text(.0))]
    Failed(tokio_postgres::Error),
}

/// Send `command` (`JOIN <backend> FROM <source>` or `REJOIN …`) to the
/// admin console of the node `config` describes, as `user` (else the
/// first of `node.admin_users`, with its password from `[[users]]` or
/// `PGPASSWORD`), printing every NOTICE to stdout until it ends.
pub async fn run(config: &Config, user: Option<&str>, command: &str) -> Result<(), CopyError> {
    let user = user
        .or_else(|| config.node.admin_users.first().map(String::as_str))
        .ok_or(CopyError::NoAdmin)?;
    let listen = config.node.listen;
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        listen.ip().to_string()
    };
    let mut pg = tokio_postgres::Config::new();
    pg.host(&host)
        .port(listen.port())
        .user(user)
        .dbname("chorus")
        .application_name("chorus copy");
    let password = config
        .users
        .iter()
        .find(|u| u.name == user)
        .and_then(|u| u.password.clone())
        .or_else(|| std::env::var("PGPASSWORD").ok());
    if let Some(password) = &password {
        pg.password(password);
    }
    let (client, mut connection) =
        pg.connect(tokio_postgres::NoTls)
            .await
            .map_err(|source| CopyError::Connect {
                address: format!("{host}:{}", listen.port()),
                source,
            })?;
    let terminal = std::io::stdout().is_terminal();
    let notices = tokio::spawn(async move {
        let mut screen = Screen {
            terminal,
            bar: false,
        };
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                screen.show(notice.message());
            }
        }
        screen.end();
    });
    let outcome = client.simple_query(command).await;
    drop(client);
    let _ = notices.await;
    outcome.map(|_| ()).map_err(CopyError::Failed)
}

/// What the terminal shows: steps as lines, progress as one bar redrawn
/// in place (on a terminal; elsewhere every step is a line).
struct Screen {
    terminal: bool,
    /// A bar is drawn on the last line.
    bar: bool,
}

impl Screen {
    fn show(&mut self, notice: &str) {
        let mut out = std::io::stdout().lock();
        match progress_of(notice).filter(|_| self.terminal) {
            Some((what, percent)) => {
                let done = usize::from(percent.min(100)) / 5;
                let _ = write!(
                    out,
                    "\r\x1b[K{what} [{}{}] {percent:>3}%",
                    "#".repeat(done),
                    ".".repeat(20 - done)
                );
                self.bar = true;
            }
            None => {
                if self.bar {
                    let _ = write!(out, "\r\x1b[K");
                    self.bar = false;
                }
                let _ = writeln!(out, "{notice}");
            }
        }
        let _ = out.flush();
    }

    fn end(&mut self) {
        if self.bar {
            let _ = writeln!(std::io::stdout());
            self.bar = false;
        }
    }
}

/// The database and share of a copy's progress NOTICE (`pg4/shop: about
/// 40% copied (…)`, see `cluster::rejoin`).
fn progress_of(notice: &str) -> Option<(&str, u8)> {
    let (what, rest) = notice.split_once(": about ")?;
    let (percent, _) = rest.split_once("% copied")?;
    Some((what, percent.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::progress_of;

    #[test]
    fn a_progress_notice_gives_its_database_and_share() {
        assert_eq!(
            progress_of("pg4/shop: about 40% copied (12 of 30 MB)"),
            Some(("pg4/shop", 40))
        );
        assert_eq!(progress_of("pg4/shop: copying from pg1 at 0/1"), None);
        assert_eq!(progress_of("pg4: roles made: app"), None);
    }
}
