//! The admin API over HTTP, against a real server and a real SQLite outbox.

mod common;

use common::{dead, enqueue, ids, message, start};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

type R = anyhow::Result<()>;

/// The JSON body of a GET.
async fn get_json(client: &reqwest::Client, url: String) -> anyhow::Result<Value> {
    Ok(client.get(url).send().await?.json().await?)
}

async fn problem(r: reqwest::Response, status: StatusCode) -> anyhow::Result<Value> {
    assert_eq!(r.status(), status);
    assert_eq!(
        r.headers()["content-type"].to_str()?,
        "application/problem+json"
    );
    let body: Value = r.json().await?;
    assert_eq!(body["status"], status.as_u16());
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    Ok(body)
}

#[tokio::test]
async fn status_counts_the_outbox_and_lists_paused_topics() -> R {
    let admin = start(|s| s).await?;
    enqueue(
        &admin.store,
        &[message("a", "e", None, 1), message("a", "e", None, 2)],
    )
    .await?;
    dead(&admin.store, &[message("b", "e", None, 3)], "boom").await?;
    // `dead` claimed everything: the two of "a" were failed too. Make them pending again.
    let client = reqwest::Client::new();
    let s: Value = get_json(&client, admin.url("/admin/api/status")).await?;
    assert_eq!(
        (s["pending"].as_i64(), s["dead"].as_i64()),
        (Some(0), Some(3))
    );
    client
        .post(admin.url("/admin/api/topics/a/pause"))
        .send()
        .await?
        .error_for_status()?;
    let s: Value = get_json(&client, admin.url("/admin/api/status")).await?;
    assert_eq!(s["paused_topics"], json!(["a"]));
    assert!(s["relay"].is_null());
    assert!(s["oldest_pending_age_seconds"].is_null());
    Ok(())
}

#[tokio::test]
async fn dead_letters_are_filtered_paged_and_shown() -> R {
    let admin = start(|s| s).await?;
    let msgs: Vec<_> = (0..7)
        .map(|n| {
            let topic = if n < 4 { "orders" } else { "mail" };
            message(
                topic,
                if n % 2 == 0 { "created" } else { "paid" },
                Some("k"),
                n,
            )
        })
        .collect();
    dead(
        &admin.store,
        &msgs,
        "HTTP 503 from https://user:secret@hook.example/x",
    )
    .await?;
    let client = reqwest::Client::new();
    let get = |q: &str| {
        let url = admin.url(&format!("/admin/api/dead{q}"));
        let client = client.clone();
        async move { client.get(url).send().await?.json::<Value>().await }
    };
    let orders = get("?topic=orders").await?;
    assert_eq!(ids(&orders).len(), 4);
    let paid_mail = get("?topic=mail&type=paid").await?;
    assert_eq!(ids(&paid_mail), [msgs[5].id()]);
    assert_eq!(ids(&get("?error=http%20503").await?).len(), 7);
    assert!(ids(&get("?error=timeout").await?).is_empty());
    assert!(ids(&get("?key=other").await?).is_empty());
    assert!(ids(&get("?older_than=1h").await?).is_empty());

    // Pages of 3 by keyset: 3, 3, 1, in id order, each naming the next.
    let mut all = Vec::new();
    let mut q = "?limit=3".to_string();
    let mut pages = 0;
    loop {
        let page = get(&q).await?;
        pages += 1;
        all.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => q = format!("?limit=3&after={next}"),
            None => break,
        }
    }
    let mut want: Vec<Uuid> = msgs.iter().map(|m| m.id()).collect();
    want.sort();
    assert_eq!((pages, all), (3, want));

    let one: Value = get_json(
        &client,
        admin.url(&format!("/admin/api/dead/{}", msgs[2].id())),
    )
    .await?;
    assert_eq!(one["payload"], json!({ "n": 2 }));
    assert_eq!(one["headers"]["trace"], "t2");
    let error = one["last_error"].as_str().unwrap();
    assert!(!error.contains("secret"), "credentials shown: {error}");
    Ok(())
}

#[tokio::test]
async fn bad_requests_are_4xx_problems() -> R {
    let admin = start(|s| s).await?;
    let client = reqwest::Client::new();
    let unknown = Uuid::now_v7();
    let r = client
        .get(admin.url(&format!("/admin/api/dead/{unknown}")))
        .send()
        .await?;
    let body = problem(r, StatusCode::NOT_FOUND).await?;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains(&unknown.to_string())
    );
    let r = client
        .post(admin.url(&format!("/admin/api/dead/{unknown}/retry")))
        .send()
        .await?;
    problem(r, StatusCode::NOT_FOUND).await?;
    let r = client
        .delete(admin.url(&format!("/admin/api/dead/{unknown}")))
        .send()
        .await?;
    problem(r, StatusCode::NOT_FOUND).await?;
    for (q, status) in [
        ("/admin/api/dead/not-a-uuid", StatusCode::BAD_REQUEST),
        ("/admin/api/dead?limit=0", StatusCode::UNPROCESSABLE_ENTITY),
        (
            "/admin/api/dead?limit=5000",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("/admin/api/dead?limit=many", StatusCode::BAD_REQUEST),
        ("/admin/api/dead?after=nope", StatusCode::BAD_REQUEST),
        (
            "/admin/api/dead?older_than=soon",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("/admin/api/dead?colour=red", StatusCode::BAD_REQUEST),
        (
            "/admin/api/relays?within=0",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("/admin/api/nothing", StatusCode::NOT_FOUND),
    ] {
        let r = client.get(admin.url(q)).send().await?;
        assert_eq!(r.status(), status, "{q}");
        problem(r, status).await?;
    }
    let post = |path: &str, body: &'static str| {
        client
            .post(admin.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, status) in [
        ("{", StatusCode::BAD_REQUEST),
        ("{}", StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"ids": []}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (
            r#"{"all": true, "topic": "x"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (r#"{"ids": ["x"]}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"everything": true}"#, StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        for path in ["/admin/api/dead/retry", "/admin/api/dead/purge"] {
            let r = post(path, body).await?;
            assert_eq!(r.status(), status, "{path} {body}");
            problem(r, status).await?;
        }
    }
    let r = client.put(admin.url("/admin/api/status")).send().await?;
    problem(r, StatusCode::METHOD_NOT_ALLOWED).await?;
    let r = client
        .post(admin.url("/admin/api/topics/%20/pause"))
        .send()
        .await?;
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await?;
    Ok(())
}

#[tokio::test]
async fn retry_and_purge_take_one_a_selection_or_a_filter() -> R {
    let admin = start(|s| s).await?;
    let msgs: Vec<_> = (0..6)
        .map(|n| message(if n < 3 { "a" } else { "b" }, "e", None, n))
        .collect();
    dead(&admin.store, &msgs, "boom").await?;
    let client = reqwest::Client::new();
    let r: Value = client
        .post(admin.url(&format!("/admin/api/dead/{}/retry", msgs[0].id())))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(r["retried"], 1);
    let r: Value = client
        .post(admin.url("/admin/api/dead/retry"))
        .json(&json!({ "ids": [msgs[1].id(), Uuid::now_v7()] }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(
        (r["retried"].as_u64(), r["asked"].as_u64()),
        (Some(1), Some(2))
    );
    let r: Value = client
        .post(admin.url("/admin/api/dead/purge"))
        .json(&json!({ "topic": "b", "older_than": "1h" }))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r["purged"], 0, "young letters purged");
    let r: Value = client
        .post(admin.url("/admin/api/dead/purge"))
        .json(&json!({ "topic": "b" }))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r["purged"], 3);
    let r = client
        .delete(admin.url(&format!("/admin/api/dead/{}", msgs[2].id())))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let s: Value = get_json(&client, admin.url("/admin/api/status")).await?;
    assert_eq!(
        (s["pending"].as_i64(), s["dead"].as_i64()),
        (Some(2), Some(0))
    );
    let r: Value = client
        .post(admin.url("/admin/api/dead/retry"))
        .json(&json!({ "all": true }))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r["retried"], 0);
    Ok(())
}

#[tokio::test]
async fn topics_pause_and_resume() -> R {
    let admin = start(|s| s).await?;
    let client = reqwest::Client::new();
    let r: Value = client
        .post(admin.url("/admin/api/topics/payments.created/pause"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        (r["paused"].as_bool(), r["changed"].as_bool()),
        (Some(true), Some(true))
    );
    let paused: Value = get_json(&client, admin.url("/admin/api/topics/paused")).await?;
    assert_eq!(paused, json!(["payments.created"]));
    let r: Value = client
        .post(admin.url("/admin/api/topics/payments.created/resume"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r["changed"], true);
    let r: Value = client
        .post(admin.url("/admin/api/topics/payments.created/resume"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r["changed"], false);
    Ok(())
}

#[tokio::test]
async fn relays_that_report_are_listed() -> R {
    let admin = start(|s| s).await?;
    let store = admin.dyn_store();
    store.heartbeat("relay-a", "working").await?;
    store.heartbeat("relay-b", "stopped").await?;
    let relays: Value = reqwest::get(admin.url("/admin/api/relays"))
        .await?
        .json()
        .await?;
    let listed: Vec<(&str, &str)> = relays
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, [("relay-a", "working"), ("relay-b", "stopped")]);
    assert!(relays[0]["age_seconds"].as_f64().unwrap() < 60.0);
    Ok(())
}

#[tokio::test]
async fn a_configured_token_is_required_by_the_api_but_not_the_page() -> R {
    let admin = start(|s| s.with_token(Some("s3cret-token".into()))).await?;
    let client = reqwest::Client::new();
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic s3cret-token"),
        Some("Bearer "),
    ] {
        let mut req = client.get(admin.url("/admin/api/status"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await?;
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer realm=\"outbox-admin\""
        );
        problem(r, StatusCode::UNAUTHORIZED).await?;
    }
    let r = client
        .post(admin.url(&format!("/admin/api/dead/{}/retry", Uuid::now_v7())))
        .send()
        .await?;
    problem(r, StatusCode::UNAUTHORIZED).await?;
    let ok = client
        .get(admin.url("/admin/api/status"))
        .bearer_auth("s3cret-token")
        .send()
        .await?;
    assert_eq!(ok.status(), StatusCode::OK);
    let auth: Value = get_json(&client, admin.url("/admin/api/auth")).await?;
    assert_eq!(auth["token_required"], true);
    let page = client.get(admin.url("/admin/")).send().await?;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()?
            .starts_with("text/html")
    );
    Ok(())
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary() -> R {
    let admin = start(|s| s).await?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let r = client.get(admin.url("/admin")).send().await?;
    assert!(r.status().is_redirection(), "{}", r.status());
    assert_eq!(r.headers()["location"], "/admin/");
    for (path, kind) in [
        ("/admin/", "text/html"),
        ("/admin/app.js", "text/javascript"),
        ("/admin/style.css", "text/css"),
    ] {
        let r = client.get(admin.url(path)).send().await?;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(
            r.headers()["content-type"].to_str()?.starts_with(kind),
            "{path}"
        );
        let body = r.text().await?;
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path} loads something from elsewhere"
        );
    }
    Ok(())
}
