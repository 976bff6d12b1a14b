//! Walking a paged listing (`users`, `channels`) to its end.
//!
//! The gateway answers one page at a time and puts a `cursor` in every page but the last;
//! sending it back gets the next page. A client that read only the first reply would miss
//! every name after `MAX_LIST_PAGE`.

use std::future::Future;

use super::ClientError;

/// One page: its names and the cursor of the next page (`None` on the last one).
pub type Page = (Vec<String>, Option<String>);

/// Calls `fetch` with `None`, then with each page's cursor, until a page has none; returns
/// every name in order. A cursor handed out twice is a server bug that would loop forever:
/// it ends the walk with an error.
pub async fn collect_pages<F, Fut>(mut fetch: F) -> Result<Vec<String>, ClientError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<Page, ClientError>>,
{
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = fetch(cursor.clone()).await?;
        names.extend(page);
        match next {
            None => return Ok(names),
            Some(next) if cursor.as_ref() == Some(&next) => {
                return Err(ClientError::Decode(format!(
                    "the server repeated the cursor {next:?}"
                )));
            }
            next => cursor = next,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn every_page_is_read_with_the_previous_cursor() {
        let asked = Mutex::new(Vec::new());
        let names = collect_pages(|cursor| {
            asked.lock().expect("lock").push(cursor.clone());
            let page = match cursor.as_deref() {
                None => (vec!["a".into(), "b".into()], Some("b".into())),
                Some("b") => (vec!["c".into()], Some("c".into())),
                Some(_) => (vec!["d".into()], None),
            };
            async move { Ok(page) }
        })
        .await;
        assert_eq!(
            names,
            Ok(vec!["a", "b", "c", "d"]
                .into_iter()
                .map(String::from)
                .collect())
        );
        assert_eq!(
            asked.into_inner().expect("lock"),
            vec![None, Some("b".into()), Some("c".into())]
        );
    }

    #[tokio::test]
    async fn an_empty_page_with_a_cursor_is_not_the_end() {
        let names = collect_pages(|cursor| async move {
            Ok(match cursor {
                None => (vec![], Some("x".into())),
                Some(_) => (vec!["y".into()], None),
            })
        })
        .await;
        assert_eq!(names, Ok(vec!["y".to_owned()]));
    }

    #[tokio::test]
    async fn a_repeated_cursor_ends_the_walk() {
        let result = collect_pages(|_| async { Ok((vec!["a".into()], Some("a".into()))) }).await;
        assert!(matches!(result, Err(ClientError::Decode(_))), "{result:?}");
    }
}
