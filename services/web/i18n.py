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
    "lora_of": ("{name}（{parent} 的 LoRA 适配器）", "{name} (LoRA adapter on {parent})"),
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
    "error_storage": ("无法打开对话数据库：{detail}", "Cannot open the chat database: {detail}"),
    # conversation list
    "chats": ("对话", "Chats"),
    "new_chat": ("新对话", "New chat"),
    "untitled": ("未命名对话", "Untitled chat"),
    "search_chats": ("搜索对话", "Search chats"),
    "no_chats": ("还没有对话。", "No chats yet."),
    "no_match": ("没有匹配的对话。", "No chat matches."),
    "chat_menu": ("重命名或删除此对话", "Rename or delete this chat"),
    "title_label": ("标题", "Title"),
    "rename": ("重命名", "Rename"),
    "delete_chat": ("删除对话", "Delete chat"),
    "confirm_delete": ("确定删除此对话？删除后无法恢复。", "Delete this chat? This cannot be undone."),
    "delete_confirm": ("确认删除", "Delete"),
    "chat_not_found": (
        "找不到该对话（可能已删除，或不属于当前用户）。",
        "Conversation not found (it was deleted, or it is not yours).",
    ),
    "chat_busy": ("该对话正在生成回复，请等待或先停止。", "A reply is still being written in this chat; wait or stop it."),
    "import": ("导入 JSON", "Import JSON"),
    "import_help": ("导入本页面导出的 JSON 对话文件。", "Import a chat exported from this page as JSON."),
    "import_failed": ("导入失败：{detail}", "Import failed: {detail}"),
    # replies
    "copy": ("复制", "Copy"),
    "copied": ("已复制", "Copied"),
    "interrupted": ("生成被中断", "Interrupted"),
    "cut_by_error": ("生成出错，已保留部分回复", "Failed mid-reply; the text so far is kept"),
    # users
    "login_title": ("登录", "Log in"),
    "user_name": ("用户名", "User name"),
    "password": ("密码", "Password"),
    "login": ("登录", "Log in"),
    "login_failed": ("用户名或密码错误。", "Wrong user name or password."),
    "signing_in": ("正在登录…", "Signing in…"),
    "signing_out": ("正在退出…", "Signing out…"),
    "login_broken": ("无法保存登录状态，请刷新页面后重试。", "Could not keep the login; reload the page and try again."),
    "logout": ("退出登录", "Log out"),
    "signed_in_as": ("当前用户：{name}", "Signed in as {name}"),
}


CUT_LABELS: dict[str, str] = {"stopped": "stopped", "interrupted": "interrupted", "error": "cut_by_error"}
"""Why a reply was cut (its finish_reason) → the label shown under it."""


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
