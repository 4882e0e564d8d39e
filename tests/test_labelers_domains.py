"""Domain tagging of source posts by keyword rules (real CED source posts)."""

from __future__ import annotations

import pytest

from mfllm.evaluation.domains import DEFAULT_DOMAIN, DOMAINS, domain_lexicons, tag_domain

# Opening of real CED source posts (original-microblog/<event>.json), with the domain a reader gives them.
REAL_SOURCES = [
    (
        "1180_yvT0H6gYn_2320664663",
        "#狮子月助力刘翔夺冠#如果刘翔最终获得伦敦奥运会金牌，凡转发本微博并关注@给狮子座的999封信 的网友，"
        "所有人送一台三星 I9300 GALAXY SIII。",
        "Sports",
    ),
    (
        "1043_zlLXV6khN_1745530925",
        "【新浪微博最重磅消息】根据得到的内幕爆料，新浪微博即将在3月5日率先在会员中开启“微博访客记录”功能，"
        "您可以在页面右侧看到所有来访微博记录！",
        "Technology",
    ),
    (
        "1072_zbY6Pgwfk_3089923915",
        "3月27号，河南洛阳市一女子宋丽因为太漂亮，在被强奸时，不主动配合强奸,导致强奸者生殖器官折断，"
        "因失血过多而身亡。昨日洛阳市洛龙区法院审结此案，判决该女子构成过失致死罪",
        "Crime",
    ),
    (
        "1023_yBnQnf91X_1900786807",
        "东海舰队徐州号护卫舰和一艘宋级柴电常规动力潜艇以及两艘海监船在钓鱼岛海域与日本金刚号、"
        "足柄号宙斯盾级驱逐舰和白根号护卫舰发生冲突，持续45分钟。",
        "Politics",
    ),
    (
        "1008_z5c9Ugjyg_1852829134",
        "【怎么鉴定地沟油】炒菜时放一颗剥皮的蒜头(蒜子)，蒜子对黄曲霉素最敏感。如果蒜子变红色就是地沟油，"
        "含有大量黄曲霉素。",
        "Health",
    ),
    (
        "1106_yDXaVtAa2_2765114950",
        "【孔子诞辰】今天是9月28日，孔子2563年诞辰。1939年国民政府将孔子诞辰日为教师节。",
        "Culture",
    ),
    (
        "1015_zsZsVySOR_1439563882",
        "请大家转发！社会车辆让出成雅高速！留出道路给救援队医院和部队车辆，黄金72小时！时间就是生命！"
        "PS：照片是雅安现场",
        "News",
    ),
]


@pytest.mark.parametrize(("event_id", "text", "domain"), REAL_SOURCES, ids=[e for e, _, _ in REAL_SOURCES])
def test_real_sources(event_id, text, domain):
    assert tag_domain(text) == domain


def test_default_and_contract():
    assert DOMAINS == ("News", "Sports", "Politics", "Technology", "Health", "Crime", "Culture")
    assert DEFAULT_DOMAIN == "News"
    assert tag_domain("") == "News"
    assert tag_domain("今天天气不错，随便说说") in DOMAINS
    assert tag_domain("哈哈哈") == "News"
    assert set(domain_lexicons()) == set(DOMAINS)
    assert all(domain_lexicons()[d] for d in DOMAINS)


def test_mentions_and_urls_do_not_count():
    assert tag_domain("@新浪科技 @足球之夜 http://t.cn/nba 哈哈") == "News"
