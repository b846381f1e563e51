"""Page labels in Chinese (default) and English, and the human sentence for each API error."""

from __future__ import annotations

from typing import Literal

from services.web.client import APIError, APIOverloaded

Lang = Literal["zh", "en"]
LANGS: dict[Lang, str] = {"zh": "中文", "en": "English"}
DEFAULT_LANG: Lang = "zh"

# One entry per label: (Chinese, English). `str.format` fields are filled by `t(**kw)`.
_LABELS: dict[str, tuple[str, str]] = {
    "page_title": ("TeleChat 对话", "TeleChat Chat"),
    "subtitle": ("星辰语义大模型 · 流式对话", "TeleChat large language model · streaming chat"),
    "language": ("语言", "Language"),
    "generation": ("生成参数", "Generation"),
    "model": ("模型", "Model"),
    "no_model": ("（无可用模型）", "(no model available)"),
    "demo_badge": ("演示模型", "Demo model"),
    "demo_help": (
        "API 正在使用内置的小型演示模型，回答仅用于演示流程。",
        "The API serves the tiny built-in demo model; replies only demonstrate the flow.",
    ),
    "health_ready": ("API 已就绪", "API ready"),
    "health_loading": ("模型加载中", "Model loading"),
    "health_down": ("API 不可用", "API unavailable"),
    "api_key_set": ("已配置访问密钥", "API key configured"),
    "system_prompt": ("系统提示词", "System prompt"),
    "system_prompt_placeholder": ("例如：你是一个乐于助人的助手。", "e.g. You are a helpful assistant."),
    "sampling": ("随机采样", "Sampling"),
    "sampling_help": ("关闭时使用贪心解码（temperature = 0）。", "Off means greedy decoding (temperature = 0)."),
    "temperature": ("温度 temperature", "Temperature"),
    "top_p": ("Top-p", "Top-p"),
    "top_k": ("Top-k（0 表示不限）", "Top-k (0 = off)"),
    "max_tokens": ("最大生成长度（token）", "Max new tokens"),
    "repetition_penalty": ("重复惩罚", "Repetition penalty"),
    "reset_params": ("恢复模型默认参数", "Reset to model defaults"),
    "export": ("导出对话", "Export conversation"),
    "export_json": ("JSON", "JSON"),
    "export_md": ("Markdown", "Markdown"),
    "chat_placeholder": ("输入消息，按 Enter 发送", "Type a message, Enter to send"),
    "welcome": ("有什么可以帮你的？", "How can I help you today?"),
    "try_these": ("试试这些：", "Try one of these:"),
    "example_1": ("你好，请介绍一下你自己", "Hello, please introduce yourself"),
    "example_2": ("用 Python 打印你好", "Print hello in Python"),
    "example_3": ("写一段很长的文字", "Write a long piece of text"),
    "stop": ("停止生成", "Stop"),
    "regenerate": ("重新生成", "Regenerate"),
    "retry": ("重试", "Retry"),
    "edit": ("编辑并重发", "Edit & resend"),
    "edit_label": ("编辑上一条消息", "Edit your last message"),
    "send": ("发送", "Send"),
    "cancel": ("取消", "Cancel"),
    "clear": ("清空对话", "Clear chat"),
    "stopped": ("已停止生成", "Stopped"),
    "cut_off": ("已达到最大长度", "Reached the length limit"),
    "stats": ("{tokens} 个 token · {seconds:.1f} 秒", "{tokens} tokens · {seconds:.1f} s"),
    "role_user": ("用户", "User"),
    "role_assistant": ("助手", "Assistant"),
    "role_system": ("系统", "System"),
    "export_title": ("TeleChat 对话记录", "TeleChat conversation"),
    "error_unavailable": (
        "无法连接到 API（`{url}`）。请确认 API 服务已启动，然后点击“重试”。",
        "Cannot reach the API at `{url}`. Make sure it is running, then press Retry.",
    ),
    "error_timeout": (
        "API 响应超时，服务可能正忙，请稍后重试。",
        "The API took too long to answer; it may be busy. Please retry shortly.",
    ),
    "error_overloaded": (
        "API 当前请求过多，请稍后重试。",
        "The API is handling too many requests right now. Please retry shortly.",
    ),
    "error_overloaded_after": (
        "API 当前请求过多，请 {seconds:.0f} 秒后重试。",
        "The API is handling too many requests right now. Please retry in {seconds:.0f} s.",
    ),
    "error_unauthorized": (
        "API 拒绝了访问密钥，请检查 API_KEY 设置。",
        "The API refused the access key. Check the API_KEY setting.",
    ),
    "error_not_ready": (
        "API 暂时无法服务（模型可能仍在加载），请稍后重试。",
        "The API cannot serve yet (the model may still be loading). Please retry shortly.",
    ),
    "error_request": ("API 拒绝了该请求：{detail}", "The API rejected the request: {detail}"),
    "error_server": ("API 出错了：{detail}", "The API ran into an error: {detail}"),
    "error_protocol": (
        "API 的回复不完整或无法解析，请重试。",
        "The API's reply was incomplete or unreadable. Please retry.",
    ),
    "error_api": ("调用 API 时出错，请重试。", "Calling the API failed. Please retry."),
    "error_unexpected": (
        "页面出现了意外错误，对话已保留。请刷新或重试。",
        "Something unexpected went wrong; the conversation is kept. Reload or retry.",
    ),
    "no_detail": ("未知原因", "no details given"),
}


def t(key: str, lang: Lang, **kw: object) -> str:
    """The label `key` in `lang`, formatted with `kw`."""
    zh, en = _LABELS[key]
    text = zh if lang == "zh" else en
    return text.format(**kw) if kw else text


def label_keys() -> set[str]:
    """Every label key (tests check the app uses only these)."""
    return set(_LABELS)


def error_text(err: APIError, lang: Lang, *, api_url: str) -> str:
    """The short sentence the page shows for an API error."""
    if isinstance(err, APIOverloaded) and err.retry_after:
        return t("error_overloaded_after", lang, seconds=err.retry_after)
    return t(err.key, lang, url=api_url, detail=err.detail or t("no_detail", lang))
